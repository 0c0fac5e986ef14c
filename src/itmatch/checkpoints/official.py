"""Read the originals' released checkpoint files safely and tell which method wrote them.

The originals save `{'model': [image state, text state], 'opt': argparse.Namespace, ...}` with `torch.save`
(SCAN/VSRN under Python 2 and torch 0.3/0.4: the legacy, non-zip format). Unpickling such a file the usual way
runs arbitrary code; `read_official` uses torch's allow-listing unpickler (`weights_only=True`) with exactly one
extra class allowed, `argparse.Namespace`, so a file carrying anything else is refused.
"""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from itmatch.errors import CheckpointError


def read_official(path: str | os.PathLike) -> dict[str, Any]:
    """Load an original checkpoint with the allow-listing unpickler (tensors, containers, Namespace only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    last: Exception | None = None
    for kwargs in ({}, {"encoding": "latin1"}):  # Python 2 pickles may hold byte strings
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                ckpt = torch.load(path, map_location="cpu", weights_only=True, **kwargs)
            break
        except UnicodeDecodeError as err:
            last = err
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
            reason = load_failure_reason(err)
            if "GLOBAL" in reason or "global" in reason:
                raise CheckpointError(
                    f"{path}: refused to unpickle it: it holds objects other than tensors and an argparse "
                    f"Namespace ({reason[:140]}); only load files you trust, and convert them in a sandbox"
                ) from None
            raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or truncated: {reason[:160]})") from None
    else:
        raise CheckpointError(f"{path}: cannot decode its strings ({last})")
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    return ckpt


def load_failure_reason(err: BaseException) -> str:
    """The informative line of a torch.load error (its weights-only errors bury it in boilerplate)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("WeightsUnpickler error:"):
            rest = line.removeprefix("WeightsUnpickler error:").strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else line)
        if "unsupported GLOBAL" in line or "Unsupported global" in line:
            return line
    return lines[0] if lines else type(err).__name__


def is_official(ckpt: dict[str, Any]) -> bool:
    """The originals' layout: a list of per-encoder state dicts under 'model' and the run's options under 'opt'."""
    return isinstance(ckpt.get("model"), list | tuple) and isinstance(ckpt.get("opt"), argparse.Namespace)


def detect_method(opt: argparse.Namespace) -> str:
    """Which repository wrote a checkpoint, from the options only that repository has."""
    if hasattr(opt, "cross_attn") and hasattr(opt, "lambda_softmax"):
        return "scan"
    raise CheckpointError(
        "unrecognised original checkpoint: its options match none of the supported repositories "
        f"(options: {', '.join(sorted(vars(opt))[:12])} ...)"
    )


def split_state(ckpt: dict[str, Any], where: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The (image, text) state dicts of an original checkpoint."""
    model = ckpt["model"]
    if len(model) != 2 or not all(isinstance(sd, dict) for sd in model):
        raise CheckpointError(f"{where}: 'model' should be [image state dict, text state dict]")
    return dict(model[0]), dict(model[1])
