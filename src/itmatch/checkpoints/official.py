"""Released checkpoints of the original repositories: recognise which method wrote a file and convert it.

The originals `torch.save` a dict holding an `argparse.Namespace` of their options. We read such files with
`torch.load(weights_only=True)` allowing that one class (nothing else pickled is executed), then hand the dict to
the first per-method converter whose `detect` accepts it.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from itmatch.checkpoints import vsrn
from itmatch.errors import CheckpointError

ALLOWED_GLOBALS = (argparse.Namespace,)
CONVERTERS = (vsrn,)  # modules with detect(official) -> bool and convert(official) -> (model config, state)


def convert(official: Any, where: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """(model config, state dict) for a released checkpoint, by the first converter that recognises it."""
    for converter in CONVERTERS:
        if converter.detect(official):
            try:
                return converter.convert(official)
            except CheckpointError as err:
                raise CheckpointError(f"{where}: {err}") from None
    names = ", ".join(c.__name__.rsplit(".", 1)[-1] for c in CONVERTERS)
    raise CheckpointError(f"{where}: neither an itmatch checkpoint nor a released checkpoint of {names}")
