"""itmatch's own checkpoint format: a plain versioned dict, written atomically, read without executing code.

`save` writes to a temporary file in the same directory, fsyncs it and renames it over the target, so a crash
mid-write leaves the previous checkpoint intact. `load` uses `torch.load(weights_only=True)`: only tensors and
plain containers come back, never arbitrary pickled objects.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from itmatch.errors import CheckpointError
from itmatch.fileio import atomic_write

FORMAT = "itmatch/1"


def save(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Atomically save a native checkpoint dict (adds the format tag)."""
    payload = {"format": FORMAT, **state}
    atomic_write(path, lambda fh: torch.save(payload, fh))


def read(path: str | os.PathLike, *, map_location: str | torch.device = "cpu",
         allowed_globals: Sequence[Any] = ()) -> Any:
    """`torch.load(weights_only=True)`: tensors and plain containers only, plus `allowed_globals` (e.g. the
    argparse.Namespace the originals pickle). Any other pickled global is refused; problems are one line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError) as err:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused:
            extra = "".join(f", {g.__module__}.{g.__qualname__}" for g in allowed_globals)
            raise CheckpointError(
                f"{path}: refusing to load: the file pickles {refused.group(1)}, which could run code "
                f"(allowed: tensors, plain containers{extra})"
            ) from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: not a readable itmatch checkpoint (corrupt, truncated or unsafe: {first[:160]})"
        ) from None


def is_native(ckpt: Any) -> bool:
    return isinstance(ckpt, dict) and ckpt.get("format") == FORMAT


def load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a native checkpoint safely; any problem is one CheckpointError line."""
    ckpt = read(path, map_location=map_location)
    if not is_native(ckpt):
        raise CheckpointError(
            f"{path}: not an itmatch checkpoint (no format tag {FORMAT!r}); "
            "released checkpoints of the original repositories are imported by `itmatch eval` per method"
        )
    return ckpt
