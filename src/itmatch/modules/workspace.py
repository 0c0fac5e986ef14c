"""Scratch buffers reused across the tiles of a scoring loop.

Tiled scoring allocates and frees intermediates of a few MB per tile. PyTorch's CPU allocator does not cache, and
glibc's malloc may give such blocks back to the kernel and fault fresh pages in for the next tile, depending on
the process's allocation history: measured up to 800 page faults per GSMN tile, which made single ops up to 15x
slower than on warm memory. A loop that writes its large intermediates into a `Workspace` (`out=`) touches the
same memory every tile.
`run_tiles` runs such a loop, on several threads when asked.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


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
        view = self._views.get((name, shape))  # views of a replaced buffer are dropped with it
        if view is not None and view.dtype == like.dtype and view.device == like.device:
            return view
        n = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = like.new_empty(n)
            self._buffers[name] = buf
            self._views = {key: v for key, v in self._views.items() if key[0] != name}
        view = buf[:n].view(shape)
        self._views[(name, shape)] = view
        return view


def run_tiles(fn: Callable[[T, Workspace], None], tiles: Sequence[T], workers: int) -> None:
    """fn(tile, workspace) for every tile, here or on `workers` threads; tiles must write disjoint outputs.

    With several workers each thread runs its tiles with one intra-op thread and its own workspace, so tiles run
    side by side instead of splitting every small operation between threads: on a 2-core machine that avoids a
    fork/join per operation (measured: 2-thread GSMN scoring at 1.5x one thread, and at times 0.6x when a core
    was briefly taken by the host, against 1.5-1.6x steadily with two workers). The caller's grad and inference
    modes are carried into the workers; its thread count is restored afterwards.
    """
    if workers <= 1 or len(tiles) <= 1:
        ws = Workspace()
        for tile in tiles:
            fn(tile, ws)
        return
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    local = threading.local()

    def run(tile: T) -> None:
        if not hasattr(local, "ws"):
            torch.set_num_threads(1)  # this thread's intra-op threads (thread-local under OpenMP)
            local.ws = Workspace()
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            fn(tile, local.ws)

    saved = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(run, tiles):  # re-raises a worker's exception here
                pass
    finally:
        torch.set_num_threads(saved)  # MKL's thread count is process-wide: the workers set it to 1
