"""Fused evaluation kernels: `torch.compile` of an element-wise chain where it pays off, eager code otherwise.

Cross attention spends the time its matrix product leaves in a chain of element-wise passes and reductions over
(tile, context, other items, query items) tensors; compiled, the chain reads each tile a few times instead of a
dozen (on the 2-core CPU: float32 SCAN t2i from ~0.70 to ~0.83-0.86 of the matrix-product rate). Compiling costs
~15 s the first time on a machine (the kernels are then cached on disk by PyTorch: ~3 s), so by default (`auto`)
only calls that need no gradient and have at least `MIN_ELEMENTS` elements in that tensor use it; training always runs
eagerly (its backward graph stays the eager one).

`ITMATCH_COMPILE=auto|on|off` chooses: `on` compiles every call that needs no gradient, `off` never. Where compiling
fails (no C++ compiler, an unsupported platform), a warning is logged once and the eager code runs. Compiled
kernels sum in another order: scores move by ~1e-7 in float32 (~1e-16 in float64), never more than 1e-6.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from itmatch.errors import ConfigError

ENV = "ITMATCH_COMPILE"
MODES = ("auto", "on", "off")
MIN_ELEMENTS = 2**27  # ~1.3e8: a 64-image x 5,000-caption chunk of the F30K test protocol (36 regions x ~14 words)

_logger = logging.getLogger(__name__)


def compile_mode() -> str:
    """`ITMATCH_COMPILE` (default auto), checked."""
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ConfigError(f"{ENV}={mode!r} is not one of {', '.join(MODES)}; unset it or pick one")
    return mode


def use_fused(elements: int, autograd: bool) -> bool:
    """Whether a kernel call over `elements` intermediate elements should run compiled (never with `autograd`)."""
    if autograd:
        return False
    mode = compile_mode()
    return mode == "on" or (mode == "auto" and elements >= MIN_ELEMENTS)


class Fused:
    """`fn` compiled (dynamic shapes: one compilation serves every tile shape) on first use, eager if that fails."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._compiled: Callable[..., Any] | None = None
        self._failed = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._failed:
            return self.fn(*args, **kwargs)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True)
        try:
            return self._compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager code computes the same scores
            self._failed = True
            _logger.warning("torch.compile of %s failed (%s: %s); running it eagerly (set %s=off to skip the "
                            "attempt)", self.fn.__name__, type(exc).__name__, str(exc).splitlines()[0][:200], ENV)
            return self.fn(*args, **kwargs)
