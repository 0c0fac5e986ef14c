"""Retrieval index: build time, query latency, approximate recall and our API's overhead over raw FAISS.

Galleries of random unit vectors (1024-d by default; 10k, 100k, 1M rows, generated in chunks into one float32
array). For each size and index kind (`flat` exact inner product; `ivf` IndexIVFFlat with nlist = min(1024, N/39)
trained on a sample, several nprobe; `hnsw` up to --hnsw-max rows, several efSearch) it reports:

- build: seconds for `GalleryIndex.build` (IVF: k-means training included) and peak RSS;
- single: latency of one query (p50/p99 over --single queries or --cap seconds, whichever ends first);
- batch: latency of a batch of --batch queries (p50/p99 over --repeats batches or --cap seconds);
- recall@k of ivf/hnsw against the exact flat results on --recall-queries queries;
- overhead: `GalleryIndex.search` against `index.search` called directly on the same FAISS index and the same
  queries, timed alternately, as median(ours) / median(direct) - 1.

    python benchmarks/search.py [--sizes 10000 100000 1000000] [--out runs/bench/search.json]

Random vectors in 1024-d have no neighbourhood structure (every query is almost equally far from every row), the
worst case for IVF/HNSW: their recall here is a floor, not what clustered model embeddings give.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from common import PeakRss
from itmatch.index import GalleryIndex, IndexSpec


def unit_vectors(n: int, dim: int, seed: int, chunk: int = 65536) -> np.ndarray:
    """(n, dim) float32 rows uniform on the sphere, generated chunk by chunk (no float64 copy of the whole)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        block = out[start : start + chunk]
        rng.standard_normal(dtype=np.float32, out=block)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return out


def percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q))


def timed_pairs(ours: Callable[[np.ndarray], object], direct: Callable[[np.ndarray], object], queries: np.ndarray,
                batch: int, count: int, cap_s: float, min_count: int) -> dict[str, float]:
    """Alternate our call and the direct FAISS call on the same query batches; latency stats in ms."""
    mine, raw = [], []
    started = time.perf_counter()
    for i in range(count):
        q = queries[(i * batch) % len(queries) :][:batch]
        if len(q) < batch:
            q = queries[:batch]
        for fn, out in ((direct, raw), (ours, mine)) if i % 2 else ((ours, mine), (direct, raw)):
            t = time.perf_counter()
            fn(q)
            out.append((time.perf_counter() - t) * 1e3)
        if i + 1 >= min_count and time.perf_counter() - started > cap_s:
            break
    return {
        "n": len(mine),
        "p50_ms": statistics.median(mine),
        "p99_ms": percentile(mine, 99),
        "direct_p50_ms": statistics.median(raw),
        "direct_p99_ms": percentile(raw, 99),
        "overhead_pct": 100.0 * (statistics.median(mine) / statistics.median(raw) - 1.0),
    }


def recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k."""
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / len(b) for a, b in zip(found, exact, strict=True)]))


def measure(gallery: GalleryIndex, queries: np.ndarray, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    k = args.k
    ours = lambda q: gallery.search(q, k)  # noqa: E731
    direct = lambda q: gallery.index.search(q, k)  # noqa: E731
    single = timed_pairs(ours, direct, queries, 1, args.single, args.cap, min_count=20)
    batch = timed_pairs(ours, direct, queries, args.batch, args.repeats, args.cap, min_count=5)
    return {"single": single, "batch": batch}


def run_size(n: int, args: argparse.Namespace) -> list[dict]:
    rows = []
    t = time.perf_counter()
    data = unit_vectors(n, args.dim, seed=n)
    queries = unit_vectors(max(args.recall_queries, args.batch, args.single), args.dim, seed=n + 1)
    print(f"[{n}] generated {n} x {args.dim} in {time.perf_counter() - t:.1f}s", flush=True)
    exact = None
    nlist = min(args.nlist, n // 39)
    configs: list[tuple[IndexSpec, list[dict[str, int]]]] = [(IndexSpec(kind="flat"), [{}])]
    configs.append((IndexSpec(kind="ivf", nlist=nlist), [{"nprobe": p} for p in args.nprobe]))
    if n <= args.hnsw_max:
        configs.append((IndexSpec(kind="hnsw", m=args.hnsw_m, ef_construction=args.ef_construction),
                        [{"ef_search": e} for e in args.ef_search]))
    for spec, variants in configs:
        with PeakRss() as rss:
            t = time.perf_counter()
            gallery = GalleryIndex.build(data, None, spec)
            build_s = time.perf_counter() - t
        print(f"[{n}] {spec.kind} built in {build_s:.1f}s", flush=True)
        for params in variants:
            gallery.with_search_params(**params)
            result = {"size": n, "dim": args.dim, "kind": spec.kind, "params": params or {},
                      "build_s": build_s, "build_peak_rss_mb": rss.peak}
            if spec.kind == "ivf":
                result["params"] = {"nlist": nlist, "train_size": min(n, 64 * nlist), **params}
            if spec.kind == "hnsw":
                result["params"] = {"m": spec.m, "ef_construction": spec.ef_construction, **params}
            result.update(measure(gallery, queries, args))
            _, found = gallery.search(queries[: args.recall_queries], args.k)
            if spec.kind == "flat":
                exact = found
            result[f"recall@{args.k}"] = recall_at(found, exact) if exact is not None else None
            rows.append(result)
            print(_line(result, args.k), flush=True)
        del gallery
    return rows


def _line(r: dict, k: int) -> str:
    params = ",".join(f"{a}={b}" for a, b in r["params"].items())
    s, b = r["single"], r["batch"]
    return (f"{r['size']:>8} {r['kind']:<5} {params:<34} {r['build_s']:8.2f} {s['p50_ms']:9.3f} {s['p99_ms']:9.3f} "
            f"{b['p50_ms']:9.2f} {b['p99_ms']:9.2f} {r[f'recall@{k}']:8.3f} {s['overhead_pct']:+7.2f} "
            f"{b['overhead_pct']:+7.2f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--single", type=int, default=200, help="single queries timed per index")
    p.add_argument("--batch", type=int, default=100, help="queries per batch")
    p.add_argument("--repeats", type=int, default=20, help="batches timed per index")
    p.add_argument("--cap", type=float, default=20.0, help="stop a latency series after this many seconds")
    p.add_argument("--recall-queries", type=int, default=500)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 64])
    p.add_argument("--hnsw-max", type=int, default=100_000, help="largest gallery HNSW is built for")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=40)
    p.add_argument("--ef-search", type=int, nargs="+", default=[64, 256])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default="runs/bench/search.json")
    args = p.parse_args()
    faiss.omp_set_num_threads(args.threads)
    machine = {"cpus": os.cpu_count(), "threads": args.threads, "faiss": faiss.__version__, "numpy": np.__version__,
               "python": platform.python_version(), "machine": platform.machine()}
    print(f"machine: {machine}")
    print(f"{'size':>8} {'kind':<5} {'params':<34} {'build_s':>8} {'1q p50':>9} {'1q p99':>9} "
          f"{'batch p50':>9} {'batch p99':>9} {f'R@{args.k}':>8} {'ovh1 %':>7} {'ovhB %':>7}   (ms; batch of "
          f"{args.batch})")
    results = []
    for n in args.sizes:
        results += run_size(n, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "machine": machine,
                               "args": vars(args), "results": results}, indent=2) + "\n", encoding="utf-8")
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
