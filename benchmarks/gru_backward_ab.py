"""One training step with the GRU's batched backward against autograd through the per-word recurrence, alternating.

    OMP_NUM_THREADS=1 python benchmarks/gru_backward_ab.py [--methods vsepp,vse_inf_bigru,scan_t2i] [--rounds 7]

Builds each method as `train_step.py` does (batch 128, the F30K preset), then times, in one process and on the same
batch, `train_step.train_step` with `packed_gru(..., batched_backward=False)` (autograd's one small weight-gradient
product per word) and with the default `_GruRecurrence` (one product over all words), alternating which goes first
per round; CPU time of the thread. Prints medians per side and the median of the per-round speed-ups.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import itmatch.modules.text_gru as text_gru  # noqa: E402
import train_step as ts  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="vsepp,vse_inf_bigru,scan_t2i")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    if torch.get_num_threads() != 1:
        ap.error("measures one CPU thread: run with OMP_NUM_THREADS=1")
    original = text_gru.packed_gru
    with tempfile.TemporaryDirectory(prefix="itmatch_gru_ab_") as tmp:
        data = ts.write_data(Path(tmp), 128)
        for method in args.methods.split(","):
            setup = ts.build(method, data, None, 128)
            batch = setup.source[0]
            times: dict[bool, list[float]] = {False: [], True: []}
            for r in range(args.rounds + 1):  # round 0 warms up
                for batched in (False, True) if r % 2 == 0 else (True, False):
                    text_gru.packed_gru = functools.partial(original, batched_backward=batched)
                    start = time.thread_time()
                    ts.train_step(setup, batch, r)
                    if r:
                        times[batched].append(time.thread_time() - start)
            text_gru.packed_gru = original
            old, new = statistics.median(times[False]), statistics.median(times[True])
            per_round = statistics.median(a / b for a, b in zip(times[False], times[True], strict=True))
            print(f"{method:14s} per-word {old:.3f} s  batched {new:.3f} s  speed-up {per_round:.3f}x "
                  f"(median per round)  load {os.getloadavg()[0]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
