"""Measurement helpers shared by the benchmarks."""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from typing import Any

from itmatch.cost import rss_mb

CLOCK_HELP = "thread: CPU time of this thread, robust to other load (needs OMP_NUM_THREADS=1)"


def add_clock_argument(ap: argparse.ArgumentParser) -> None:
    """`--clock wall|thread`, as every benchmark takes it."""
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall", help=CLOCK_HELP)


def chosen_clock(ap: argparse.ArgumentParser, args: argparse.Namespace) -> Callable[[], float]:
    """The timer `--clock` names; `thread` only with one thread (CPU time of one thread is the whole work)."""
    if args.clock != "thread":
        return time.perf_counter
    import torch

    if torch.get_num_threads() != 1:
        ap.error("--clock thread measures one CPU thread: run with OMP_NUM_THREADS=1")
    return time.thread_time


def synchronised(clock: Callable[[], float], device: Any) -> Callable[[], float]:
    """`clock`, read after the GPU's queued work has finished when `device` is a CUDA device (a call returns
    before its kernels do); `clock` itself elsewhere."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return clock

    def read() -> float:
        torch.cuda.synchronize(device)
        return clock()

    return read


class PeakRss:
    """Largest RSS seen while the block runs (sampled every 20 ms)."""

    def __enter__(self) -> PeakRss:
        self.peak, self._stop = rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def matmul_gflops(a: Any, b: Any, *, seconds: float = 2.0, clock: Callable[[], float] = time.perf_counter) -> float:
    """Sustained GFLOP/s of `a @ b` (torch tensors) repeated for `seconds` on `clock`: the roofline the benchmarks
    compare their engines with, measured in the same run and on the same clock."""
    a @ b  # warm-up
    n, start = 0, clock()
    while clock() - start < seconds:
        a @ b
        n += 1
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] * n / (clock() - start) / 1e9
