"""itmatch: image-text matching (VSE++, SCAN, VSRN, GSMN, VSE-infinity, HREM) in one faithful, fast codebase."""

from itmatch.config import list_presets, load_preset
from itmatch.evaluation import evaluate_sims
from itmatch.registry import create_model, list_models

__version__ = "0.1.0"
__all__ = ["create_model", "evaluate_sims", "list_models", "list_presets", "load_preset", "__version__"]
