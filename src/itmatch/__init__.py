"""itmatch: image-text matching (VSE++, SCAN, VSRN, GSMN, VSE-infinity, HREM) in one faithful, fast codebase."""

import os as _os

# OpenMP threads that sleep when idle, unless the environment says otherwise. libgomp reads the variable once, when
# torch loads it (below, through the registry), so it is set here, before any torch import of the package. Its
# default spin-waiting made training on a shared 2-core machine 6x slower (5.7 s per step instead of 1.0, 80 s of CPU
# instead of 14 for 30 steps of the demo): spinning threads burn the cores the other jobs and their own team need.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from itmatch.config import list_presets, load_preset  # noqa: E402
from itmatch.evaluation import evaluate_sims  # noqa: E402
from itmatch.registry import create_model, list_models  # noqa: E402

__version__ = "0.1.0"
__all__ = ["create_model", "evaluate_sims", "list_models", "list_presets", "load_preset", "__version__"]
