"""Cross-attention evaluation: our tiled engine vs a port of the original per-caption loop (written from the spec).

Shapes of the Flickr30K test protocol: 1,000 images x 5,000 captions, 36 regions, 1024-d, caption lengths drawn
like F30K's (about 12 words, plus <start>/<end>). For t2i and i2t (the README's LSE settings) it reports:
engine time for the full matrix, the port's time (measured on a sample of captions against all images in the
original's 128 x 128 shards, extrapolated linearly: every pair costs the same), their ratio, max |delta| on the
sample, peak resident memory, and GFLOP/s against a plain torch.matmul roofline on this machine.

    python benchmarks/xattn_eval.py [--dtype float32|float64] [--loop-captions 256] [--coco] [--repeats 3]
    OMP_NUM_THREADS=1 python benchmarks/xattn_eval.py --clock thread ...   # one core, CPU time: robust to load
    python benchmarks/xattn_eval.py --original ~/src/SCAN ...   # the unmodified original's loop, not the port

`--original DIR` times the original's own `xattn_score_t2i/i2t` (imported from your checkout of kuanghuei/SCAN, with
only the changes `original_step.py` prints) in the 128 x 128 shards of its `shard_xattn_*`, instead of the port.

The roofline is measured in the same process, on the same clock, just before each setting is timed.

`--coco` adds the COCO 5K shape (5,000 images x 25,000 captions): all inputs and the full float64 output are
resident, the engine runs on the first `--coco-fraction` of the captions, time is extrapolated, memory measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import PeakRss, add_clock_argument, chosen_clock, rss_mb
from common import matmul_gflops as matmul_rate
from itmatch.models.base import Encoded
from itmatch.modules.cross_attention import XAttnConfig, xattn_similarity

REGIONS, DIM = 36, 1024
SETTINGS = {  # the F30K README presets with LSE aggregation
    "t2i": XAttnConfig(direction="t2i", agg_func="LogSumExp", lambda_softmax=9.0, lambda_lse=6.0),
    "i2t": XAttnConfig(direction="i2t", agg_func="LogSumExp", lambda_softmax=4.0, lambda_lse=5.0),
}


def make_data(n_images: int, n_captions: int, seed: int = 0) -> tuple[torch.Tensor, Encoded]:
    """Unit-norm regions; captions packed (no padding), lengths = 2 + words, words ~ 5 + Gamma(4, 1.8)."""
    gen = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n_images, REGIONS, DIM, generator=gen), dim=-1)
    gamma = torch.distributions.Gamma(torch.tensor(4.0), torch.tensor(1 / 1.8))
    torch.manual_seed(seed)
    words = (5 + gamma.sample((n_captions,))).round().clamp(max=78).long()
    lengths = words + 2
    packed = F.normalize(torch.randn(int(lengths.sum()), DIM, generator=gen), dim=-1)
    return images, Encoded(packed, lengths, torch.cumsum(lengths, 0) - lengths)


# --------------------------------------------------------------------------- the original, ported from the spec
def _l2norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + 1e-8)


def _func_attention(query: torch.Tensor, context: torch.Tensor, smooth: float) -> torch.Tensor:
    """Upstream func_attention with clipped_l2norm: returns the attended context per query item."""
    n, query_len = query.shape[0], query.shape[1]
    source_len = context.shape[1]
    attn = torch.bmm(context, query.transpose(1, 2))  # (n, sourceL, queryL)
    attn = _l2norm(F.leaky_relu(attn, 0.1), 2)
    attn = attn.transpose(1, 2).contiguous().view(n * query_len, source_len)
    attn = torch.softmax(attn * smooth, dim=1).view(n, query_len, source_len)
    return torch.bmm(context.transpose(1, 2), attn.transpose(1, 2).contiguous()).transpose(1, 2)


def _cosine(x1: torch.Tensor, x2: torch.Tensor, dim: int) -> torch.Tensor:
    return (x1 * x2).sum(dim) / (x1.norm(2, dim) * x2.norm(2, dim)).clamp(min=1e-8)


def original_shard(images: torch.Tensor, captions: torch.Tensor, cap_lens: list[int], cfg: XAttnConfig) -> torch.Tensor:
    """Port of upstream xattn_score_t2i / xattn_score_i2t: a Python loop over captions."""
    n_image = images.shape[0]
    columns = []
    for i, n_word in enumerate(cap_lens):
        cap = captions[i, :n_word].unsqueeze(0).repeat(n_image, 1, 1)
        if cfg.direction == "t2i":
            att = _func_attention(cap, images, cfg.lambda_softmax)
            row = _cosine(cap, att, 2)
        else:
            att = _func_attention(images, cap, cfg.lambda_softmax)
            row = _cosine(images, att, 2)
        columns.append(torch.log(torch.exp(row * cfg.lambda_lse).sum(1, keepdim=True)) / cfg.lambda_lse)
    return torch.cat(columns, 1)


def original_sims(images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, cfg: XAttnConfig,
                  shard: int = 128, scorer=None) -> torch.Tensor:
    """Upstream shard_xattn_*'s 128 x 128 shards, each scored by the per-caption loop: `scorer(images, captions,
    lengths, cfg)` (the unmodified original's function, `original_scorer`) or, without it, the port above."""
    out = torch.empty(len(images), len(captions), dtype=images.dtype)
    for i in range(0, len(images), shard):
        for j in range(0, len(captions), shard):
            out[i : i + shard, j : j + shard] = (scorer or original_shard)(
                images[i : i + shard], captions[j : j + shard], lengths[j : j + shard].tolist(), cfg)
    return out


def original_scorer(root: str):
    """The unmodified original's `xattn_score_t2i` / `xattn_score_i2t` from the user's checkout of kuanghuei/SCAN
    (its model.py imported as `original_step.import_original` does, the changes it needs printed)."""
    from types import SimpleNamespace

    from original_step import import_original

    log: list[str] = []
    model = import_original(Path(root).expanduser(), "model", log)
    for line in log:
        print(f"original: {line}", flush=True)

    def score(images, captions, cap_lens, cfg):
        opt = SimpleNamespace(raw_feature_norm=cfg.raw_feature_norm, lambda_softmax=cfg.lambda_softmax,
                              agg_func=cfg.agg_func, lambda_lse=cfg.lambda_lse)
        fn = model.xattn_score_t2i if cfg.direction == "t2i" else model.xattn_score_i2t
        with torch.no_grad():  # upstream wraps its shards in Variable(volatile=True)
            return fn(images, captions, cap_lens, opt)

    return score


# --------------------------------------------------------------------------- measurements
CLOCK = time.perf_counter


def matmul_gflops(dtype: torch.dtype, seconds: float = 3.0) -> float:
    """Sustained GFLOP/s of a plain matmul of the engine's main shape (4608 x 1024 @ 1024 x 1792)."""
    a = torch.randn(128 * REGIONS, DIM, dtype=dtype)
    b = torch.randn(DIM, 128 * 14, dtype=dtype)
    return matmul_rate(a, b, seconds=seconds, clock=CLOCK)


def run_f30k(args: argparse.Namespace, dtype: torch.dtype) -> dict:
    images, texts = make_data(args.images, args.captions)
    lengths = texts.lengths
    flops = 2 * args.images * REGIONS * DIM * int(lengths.sum())  # the region-word dot products
    roofs = [matmul_gflops(dtype)]
    sample = torch.arange(args.loop_captions)
    from itmatch.modules.cross_attention import gather_words

    sample_caps = gather_words(texts.emb, lengths, texts.offsets, sample, int(lengths[sample].max())).to(dtype)
    out = {"shape": f"{args.images} images x {args.captions} captions x {REGIONS} regions x {DIM}-d",
           "dtype": str(dtype).removeprefix("torch."), "mean_caption_length": float(lengths.float().mean()),
           "threads": torch.get_num_threads()}
    for name, cfg in SETTINGS.items():
        roofs.append(matmul_gflops(dtype))  # again between settings: the machine's load moves
        roof = statistics.median(roofs)
        times = []
        base = rss_mb()
        with PeakRss() as peak:
            for _ in range(args.repeats):
                start = CLOCK()
                sims = xattn_similarity(images.to(dtype), texts.emb, lengths, cfg, offsets=texts.offsets,
                                        budget_mb=args.budget)
                times.append(CLOCK() - start)
        engine = statistics.median(times)
        start = CLOCK()
        loop = original_sims(images.to(dtype), sample_caps, lengths[sample], cfg, scorer=args.scorer)
        loop_sample = CLOCK() - start
        loop_full = loop_sample * args.captions / args.loop_captions
        delta = float((loop - sims[:, sample]).abs().max())
        gflops = flops / engine / 1e9
        out[name] = {"engine_s_median": round(engine, 2), "engine_runs_s": [round(t, 2) for t in times],
                     "loop": (f"the unmodified original's xattn_score_{name} ({args.original})" if args.original
                              else "port of the original per-caption loop (written from the spec)"),
                     "loop_s_extrapolated": round(loop_full, 1),
                     "loop_sample": f"{args.loop_captions} captions in {loop_sample:.1f}s",
                     "speedup": round(loop_full / engine, 1), "max_abs_delta": delta,
                     "peak_rss_mb": round(peak.peak), "peak_rss_increase_mb": round(peak.peak - base),
                     "gflops": round(gflops, 1), "matmul_roofline_gflops": round(roof, 1),
                     "roofline_fraction": round(gflops / roof, 3)}
        print(name, json.dumps(out[name]), flush=True)
    return out


def run_coco(args: argparse.Namespace, dtype: torch.dtype) -> dict:
    images, texts = make_data(5000, 25000, seed=1)
    images = images.to(dtype)
    n_cols = int(25000 * args.coco_fraction)
    cfg = SETTINGS["t2i"]
    with PeakRss() as peak:
        full = torch.empty(5000, 25000, dtype=torch.float64)  # the whole float64 result, as evaluation keeps
        start = time.perf_counter()
        part = xattn_similarity(images, texts.emb, texts.lengths[:n_cols], cfg, offsets=texts.offsets[:n_cols],
                                budget_mb=args.budget)
        seconds = time.perf_counter() - start
        full[:, :n_cols] = part.double()
    return {"shape": "5000 images x 25000 captions (COCO 5K)", "dtype": str(dtype).removeprefix("torch."),
            "captions_scored": n_cols, "seconds": round(seconds, 1),
            "extrapolated_full_s": round(seconds * 25000 / n_cols), "peak_rss_mb": round(peak.peak),
            "target_mb": 4096, "ok": peak.peak <= 4096}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--captions", type=int, default=5000)
    ap.add_argument("--loop-captions", type=int, default=256)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=1024.0, help="MB for engine intermediates per tile")
    ap.add_argument("--original", metavar="DIR",
                    help="your checkout of kuanghuei/SCAN: time its own xattn_score_t2i/i2t instead of the port")
    ap.add_argument("--coco", action="store_true")
    ap.add_argument("--coco-fraction", type=float, default=0.1)
    add_clock_argument(ap)
    ap.add_argument("--out", help="write the figures as JSON")
    args = ap.parse_args()
    global CLOCK
    CLOCK = chosen_clock(ap, args)
    dtype = getattr(torch, args.dtype)
    args.scorer = original_scorer(args.original) if args.original else None
    result = {"f30k": run_f30k(args, dtype), "clock": args.clock, "loadavg": os.getloadavg()}
    if args.coco:
        result["coco5k"] = run_coco(args, dtype)
        print("coco5k", json.dumps(result["coco5k"]), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
