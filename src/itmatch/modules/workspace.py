"""Scratch buffers reused across the tiles of a scoring loop.

Tiled scoring allocates and frees intermediates of a few MB per tile. PyTorch's CPU allocator does not cache, and
glibc's malloc may give such blocks back to the kernel and fault fresh pages in for the next tile: hundreds of
page faults per tile, which measured up to 15x slower than the arithmetic on them (benchmarks/gsmn_eval.py). A
loop that writes its large intermediates into a `Workspace` (`out=`) touches the same memory every tile.
"""

from __future__ import annotations

import math

import torch


class Workspace:
    """One flat buffer per name, grown on demand; `take` returns a view of its first elements.

    A name's previous view is overwritten by the next `take` of that name, so each name must hold one live
    intermediate at a time. Not for tensors that autograd needs (in-place writes into saved tensors).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._views: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}  # tiles repeat shapes: no view op per take

    def take(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised (shape) tensor with `like`'s dtype and device."""
        buf = self._buffers.get(name)
        if buf is not None and buf.dtype == like.dtype and buf.device == like.device:
            view = self._views.get((name, shape))
            if view is not None:
                return view
        n = math.prod(shape)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = like.new_empty(n)
            self._buffers[name] = buf
            self._views = {key: v for key, v in self._views.items() if key[0] != name}
        view = buf[:n].view(shape)
        self._views[(name, shape)] = view
        return view
