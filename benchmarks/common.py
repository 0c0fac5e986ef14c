"""Measurement helpers shared by the benchmarks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


def rss_mb() -> float:
    """Current resident set size of this process, in MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


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
