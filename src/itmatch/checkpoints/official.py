"""Helpers shared by the per-method importers of the originals' released checkpoints.

The originals save `{'model': [image state, text state], 'opt': argparse.Namespace, ...}` with `torch.save`; the
files are read by `native.read(..., allow=(argparse.Namespace,))` (torch's allow-listing unpickler) and each
method's module offers `detect(ckpt) -> bool` and `convert(ckpt) -> (model config, state dict)`.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from itmatch.errors import CheckpointError


def is_two_encoder_release(ckpt: Any) -> bool:
    """The originals' layout: [image state, text state] under 'model' and the run's options under 'opt'."""
    model = ckpt.get("model") if isinstance(ckpt, dict) else None
    return (isinstance(model, list | tuple) and len(model) == 2 and all(isinstance(m, dict) for m in model)
            and isinstance(ckpt.get("opt"), argparse.Namespace))


def split_state(ckpt: dict[str, Any], where: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The (image, text) state dicts of an original checkpoint."""
    model = ckpt["model"]
    if len(model) != 2 or not all(isinstance(sd, dict) for sd in model):
        raise CheckpointError(f"{where}: 'model' should be [image state dict, text state dict]")
    return dict(model[0]), dict(model[1])


def option(opt: Any, name: str, kind: type, default: Any = None) -> Any:
    """`opt.<name>` of a release converted to `kind` (float, int, str, bool), or one line naming the option."""
    value = getattr(opt, name, default)
    if value is None:
        raise CheckpointError(f"the release's options have no {name}")
    try:
        if kind is str and not isinstance(value, str) or kind in (int, float) and isinstance(value, bool | str):
            raise TypeError
        return kind(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"the release's option {name}={value!r} is not a {kind.__name__}") from None
