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


def read(path: str | os.PathLike, *, map_location: str | torch.device = "cpu", allow: Sequence[type] = ()) -> Any:
    """`torch.load(weights_only=True)` plus the classes in `allow`; any problem is one CheckpointError line.

    A file that pickles anything else (e.g. a `__reduce__` calling os.system) is refused before it runs.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        reason = load_failure_reason(err)
        unsafe = re.search(r"GLOBAL ([\w.]+)", reason)
        if unsafe:
            allowed = "".join(f", {c.__module__}.{c.__qualname__}" for c in allow)
            raise CheckpointError(
                f"{path}: refusing to load: the file pickles {unsafe.group(1)}, which could run code; only "
                f"tensors, plain containers{allowed} are allowed"
            ) from None
        raise CheckpointError(
            f"{path}: not a readable itmatch checkpoint (corrupt, truncated or unsafe: {reason[:160]})"
        ) from None


def load_failure_reason(err: BaseException) -> str:
    """The informative line of a torch.load error (its weights-only errors bury it in boilerplate)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("WeightsUnpickler error:"):
            rest = line.removeprefix("WeightsUnpickler error:").strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else line)
        if "GLOBAL" in line or "Unsupported global" in line:
            return line
    return lines[0] if lines else type(err).__name__


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
