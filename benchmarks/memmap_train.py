"""Peak resident memory while training VSE++ from an F30K-sized feature file (29,000 x 36 x 2048 float32).

The originals `np.load` the whole file (8.5 GB for F30K train, 33 GB for COCO). We memory-map it and release
mapped pages as we go, so resident memory should stay far below the file size. Target: peak RSS <= 3 GB.

    python benchmarks/memmap_train.py [--dir /tmp/itmatch_memmap] [--steps 200] [--keep]

Prints the command's figures: file size, write time, training time per step, peak RSS (ru_maxrss) and the
largest RSS seen during training, sampled by a thread.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from common import PeakRss, rss_mb

N_TRAIN, REGIONS, DIM = 29_000, 36, 2048
WORDS = "a an the red blue green small large cube ball cone left right of on near two three man dog".split()


def write_dataset(root: Path, n_train: int) -> float:
    """Random non-negative features written chunk by chunk (never whole in RAM) plus random captions."""
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("dev", 200)):
        arr = np.lib.format.open_memmap(root / f"{split}_ims.npy", mode="w+", dtype=np.float32,
                                        shape=(n, REGIONS, DIM))
        for start in range(0, n, 500):
            stop = min(n, start + 500)
            arr[start:stop] = rng.random((stop - start, REGIONS, DIM), dtype=np.float32)
            arr.flush()
        del arr
        lengths = rng.integers(6, 20, size=5 * n)
        caps = [" ".join(rng.choice(WORDS, size=k)) + " ." for k in lengths]
        (root / f"{split}_caps.txt").write_text("\n".join(caps) + "\n", encoding="utf-8")
    return time.perf_counter() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/itmatch_memmap")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--n-train", type=int, default=N_TRAIN)
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args()

    from itmatch.cli import main as cli_main
    from itmatch.config import load_preset
    from itmatch.training import fit

    root = Path(args.dir) / "f30k_precomp"
    if not (root / "train_ims.npy").is_file():
        print(f"writing {args.n_train} x {REGIONS} x {DIM} float32 to {root} ...", flush=True)
        # In a child process: pages dirtied through the writer's mapping would count in *our* peak RSS.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            print(f"  written in {pool.submit(write_dataset, root, args.n_train).result():.0f}s", flush=True)
        assert cli_main(["-q", "data", "vocab", str(root)]) == 0
    size_gb = (root / "train_ims.npy").stat().st_size / 1e9
    out = Path(args.dir) / "run"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_preset("vsepp_f30k_precomp", [f"data.path={json.dumps(str(root))}",
                                             f"train.max_steps={args.steps}", "train.epochs=1"])
    rss_before = rss_mb()
    with PeakRss() as peak:
        started = time.perf_counter()
        summary = fit(cfg, out)
        seconds = time.perf_counter() - started
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "file_gb": round(size_gb, 2), "steps": summary["steps"], "batch_size": cfg.data.batch_size,
        "seconds_per_step": round(seconds / max(summary["steps"], 1), 3),
        "rss_before_training_mb": round(rss_before), "peak_rss_sampled_mb": round(peak.peak),
        "ru_maxrss_mb": round(maxrss_mb), "target_mb": 3072, "ok": maxrss_mb <= 3072,
    }
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
