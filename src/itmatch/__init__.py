"""itmatch: image-text matching (VSE++, SCAN, VSRN, GSMN, VSE-infinity, HREM) in one faithful, fast codebase.

The public API: `load` a checkpoint as a `Matcher` (encode your images and sentences, score them), `open_dataset`,
`evaluate` models (or ensembles) with the papers' protocol, `train` a preset; methods are `MethodSpec`s in the
registry (`list_models`, `register_method`, `load_plugin`), presets are data (`list_presets`, `load_preset`).
"""

import os as _os

# OpenMP threads that sleep when idle, unless the environment says otherwise. libgomp reads the variable once, when
# torch loads it (below, through the API's imports), so it is set here, before any torch import of the package. Its
# default spin-waiting made training on a shared 2-core machine 6x slower (5.7 s per step instead of 1.0, 80 s of CPU
# instead of 14 for 30 steps of the demo): spinning threads burn the cores the other jobs and their own team need.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from itmatch.api import Dataset, Evaluation, Matcher, evaluate, load, open_dataset, train  # noqa: E402
from itmatch.config import list_presets, load_preset  # noqa: E402
from itmatch.evaluation import evaluate_sims  # noqa: E402
from itmatch.method import Importer, MethodSpec, SplitInputs  # noqa: E402
from itmatch.models.base import Encoded, RetrievalModel  # noqa: E402
from itmatch.recipe import Recipe  # noqa: E402
from itmatch.registry import create_model, list_models, load_plugin, method_spec, register_method  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "Dataset", "Encoded", "Evaluation", "Importer", "Matcher", "MethodSpec", "Recipe", "RetrievalModel",
    "SplitInputs", "__version__", "create_model", "evaluate", "evaluate_sims", "list_models", "list_presets", "load",
    "load_plugin", "load_preset", "method_spec", "open_dataset", "register_method", "train",
]
