"""itmatch: image-text matching (VSE++, SCAN, VSRN, GSMN, VSE-infinity, HREM) in one faithful, fast codebase.

The public API: `load` a checkpoint as a `Matcher` (encode your images and sentences, score them), `open_dataset`,
`evaluate` models (or ensembles) with the papers' protocol, `train` a preset; methods are `MethodSpec`s in the
registry (`list_models`, `register_method`, `load_plugin`), presets are data (`list_presets`, `load_preset`).
"""

from itmatch.api import Dataset, Evaluation, Matcher, evaluate, load, open_dataset, train
from itmatch.config import list_presets, load_preset
from itmatch.evaluation import evaluate_sims
from itmatch.method import Importer, MethodSpec, SplitInputs
from itmatch.models.base import Encoded, RetrievalModel
from itmatch.recipe import Recipe
from itmatch.registry import create_model, list_models, load_plugin, method_spec, register_method

__version__ = "0.1.0"
__all__ = [
    "Dataset", "Encoded", "Evaluation", "Importer", "Matcher", "MethodSpec", "Recipe", "RetrievalModel",
    "SplitInputs", "__version__", "create_model", "evaluate", "evaluate_sims", "list_models", "list_presets", "load",
    "load_plugin", "load_preset", "method_spec", "open_dataset", "register_method", "train",
]
