"""Training VSE++ from a memory-mapped feature file: peak resident memory, and whether reading shows in the step.

The originals `np.load` the whole file (8.5 GB for F30K train, 33 GB for COCO). We memory-map it and release
mapped pages as we go, so resident memory stays far below the file size; batches are read ahead by DataLoader
workers (`data.workers`), so the disk should never show in the step time. Targets: peak RSS <= 2 GB (this process
and its workers), and seconds per step within 10 % of the same training on images already in the page cache.

    python benchmarks/memmap_train.py [--coco] [--dir /tmp/itmatch_memmap] [--steps 40] [--workers 1] [--rounds 2]
        [--keep] [--write-only]

`--coco` writes 113,287 x 36 x 2048 float32 (33 GB; F30K's 29,000 by default). Runs alternate, `--rounds` times:
"disk" trains on the whole file, evicted from the page cache first (`posix_fadvise` DONTNEED), on random batches
drawn with another seed in each round (the reads go to the disk), "cached" on its first `--cached-images`
images after reading them once (so they are in the page cache).
Prints file size, write time, median seconds per step of each kind (the first 3 steps of a run excluded), their
ratio, peak RSS of this process (sampled and ru_maxrss) and of the workers (ru_maxrss of the children).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from common import PeakRss

N_TRAIN, N_COCO, REGIONS, DIM = 29_000, 113_287, 36, 2048
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


def train_run(root: Path, out: Path, *, steps: int, workers: int, images: int, seed: int = 0) -> dict:
    """Train VSE++ for `steps` steps; seconds per step (median after 3) and peak RSS of this process. `seed`
    draws the batches: each "disk" run takes another, so that it reads images no earlier run brought into the
    page cache."""
    from itmatch.config import load_preset
    from itmatch.training import fit

    shutil.rmtree(out, ignore_errors=True)
    overrides = [f"data.path={json.dumps(str(root))}", f"train.max_steps={steps}", "train.epochs=1",
                 f"data.workers={workers}", f"train.seed={seed}"]
    if images:
        overrides.append(f"data.train_images={images}")
    cfg = load_preset("vsepp_f30k_precomp", overrides)
    stamps: list[float] = []
    with PeakRss() as peak:
        fit(cfg, out, on_step=lambda state, stats: stamps.append(time.perf_counter()))
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][2:]
    return {"seconds_per_step": statistics.median(gaps), "steps": len(stamps), "peak_rss_mb": peak.peak}


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (clean pages: no root needed), so a "disk" run starts cold."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: Path, n_bytes: int) -> float:
    """Read the first n_bytes of a file once (into the page cache); seconds taken."""
    started = time.perf_counter()
    with open(path, "rb") as fh:
        left = n_bytes
        while left > 0 and (chunk := fh.read(min(left, 64 << 20))):
            left -= len(chunk)
    return time.perf_counter() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/itmatch_memmap")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--n-train", type=int, default=N_TRAIN)
    ap.add_argument("--coco", action="store_true", help=f"COCO's {N_COCO:,} training images (33 GB)")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers reading ahead")
    ap.add_argument("--cached-images", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--no-willneed", action="store_true",
                    help="do not ask the kernel for a batch's rows ahead (MappedArray's MADV_WILLNEED): the before")
    ap.add_argument("--write-only", action="store_true",
                    help="write the files and stop (implies --keep): a later run measures, and its workers' peak "
                         "RSS is then theirs, not the writer's")
    args = ap.parse_args()
    n_train = N_COCO if args.coco else args.n_train
    if args.no_willneed:  # inherited by the DataLoader workers (forked)
        from itmatch.data.npy import MappedArray

        MappedArray._will_need = lambda self, rows: None

    from itmatch.cli import main as cli_main

    root = Path(args.dir) / ("coco_precomp" if args.coco else "f30k_precomp")
    wrote = not (root / "train_ims.npy").is_file()
    if wrote:
        free_gb = shutil.disk_usage(args.dir if Path(args.dir).exists() else "/tmp").free / 1e9
        need_gb = n_train * REGIONS * DIM * 4 / 1e9
        if free_gb < need_gb * 1.2:
            print(f"only {free_gb:.0f} GB free for a {need_gb:.0f} GB file; pass a smaller --n-train")
            return 1
        print(f"writing {n_train} x {REGIONS} x {DIM} float32 to {root} ...", flush=True)
        # In a child process: pages dirtied through the writer's mapping would count in *our* peak RSS.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            print(f"  written in {pool.submit(write_dataset, root, n_train).result():.0f}s", flush=True)
        assert cli_main(["-q", "data", "vocab", str(root)]) == 0
    if args.write_only:
        return 0
    size_gb = (root / "train_ims.npy").stat().st_size / 1e9
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    runs: dict[str, list[dict]] = {"cached": [], "disk": []}
    warm_s = warm(root / "train_ims.npy", 128 + args.cached_images * REGIONS * DIM * 4)
    for r in range(args.rounds):
        for kind in ("cached", "disk"):
            if kind == "cached":
                warm(root / "train_ims.npy", 128 + args.cached_images * REGIONS * DIM * 4)
            else:
                evict(root / "train_ims.npy")
            res = train_run(root, Path(args.dir) / "run", steps=args.steps, workers=args.workers,
                            images=args.cached_images if kind == "cached" else 0,
                            seed=0 if kind == "cached" else r + 1)
            res["loadavg"] = os.getloadavg()[0]
            runs[kind].append(res)
            print(f"round {r + 1} {kind:6s} {res['seconds_per_step']:.3f} s/step  peak RSS {res['peak_rss_mb']:.0f} MB"
                  f"  load {res['loadavg']:.1f}", flush=True)
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # ru_maxrss of the children is the largest of any child: after writing the file here it is the writer's
    # (its mapping of the whole file), so the workers' figure is only meaningful on a file written beforehand.
    children_mb = None if wrote else resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    cached = statistics.median(x["seconds_per_step"] for x in runs["cached"])
    disk = statistics.median(x["seconds_per_step"] for x in runs["disk"])
    peak = max(x["peak_rss_mb"] for xs in runs.values() for x in xs)
    result = {
        "file_gb": round(size_gb, 2), "images": n_train, "machine_memory_gb": round(mem_gb, 1),
        "workers": args.workers, "willneed": not args.no_willneed,
        "steps_per_run": args.steps, "batch_size": 128, "rounds": args.rounds,
        "first_read_of_cached_part_s": round(warm_s, 1),
        "cached_s_per_step": round(cached, 3), "disk_s_per_step": round(disk, 3),
        "disk_over_cached": round(disk / cached, 3),
        "peak_rss_sampled_mb": round(peak), "ru_maxrss_mb": round(maxrss_mb),
        "workers_ru_maxrss_mb": None if children_mb is None else round(children_mb), "target_rss_mb": 2048,
        "ok": maxrss_mb <= 2048 and (children_mb or 0) <= 2048 and disk <= 1.1 * cached,
        "runs": runs,
    }
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
