"""itmatch's own checkpoint format: a plain versioned dict, written atomically, read without executing code.

`save` writes to a temporary file in the same directory, fsyncs it and renames it over the target, so a crash
mid-write leaves the previous checkpoint intact. `load` uses `torch.load(weights_only=True)`: only tensors and
plain containers come back, never arbitrary pickled objects.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from itmatch.checkpoints.official import load_failure_reason
from itmatch.errors import CheckpointError
from itmatch.fileio import atomic_write

FORMAT = "itmatch/1"


def save(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Atomically save a native checkpoint dict (adds the format tag)."""
    payload = {"format": FORMAT, **state}
    atomic_write(path, lambda fh: torch.save(payload, fh))


def load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a native checkpoint safely; any problem is one CheckpointError line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError) as err:
        reason = load_failure_reason(err)[:160]
        raise CheckpointError(
            f"{path}: not a readable itmatch checkpoint (corrupt, truncated or unsafe: {reason})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not an itmatch checkpoint (no format tag {FORMAT!r}); "
            "released checkpoints of the original repositories are imported by `itmatch eval` per method"
        )
    return ckpt
