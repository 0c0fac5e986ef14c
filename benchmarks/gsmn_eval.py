"""GSMN evaluation: our tiled scoring vs a port of the original per-caption loop (tests/gsmn_reference.py).

Shapes of the Flickr30K test protocol: 36 regions, 1024-d, 16 blocks, lambda 20, caption lengths drawn like F30K's
(about 12 words plus <start>/<end>), full-size model (random weights; the cost does not depend on them). Both
sides are timed on samples of the 1,000 x 5,000 matrix and extrapolated per pair (every pair costs the same):
ours on `--images` x `--captions` (encoded galleries, packed captions, as `itmatch eval` scores them), the loop
on `--loop-images` x `--loop-captions` in the original's 80-image shards. The two sides are timed in turn for
`--rounds` rounds and the medians reported (per pair, and of the per-round ratios), so that a change in machine
load hits both. max |delta| is taken on the loop's sample, for the dense and the sparse variant. The roofline
fraction is printed twice: for the region-word dot products alone (bounded by their share of all products, about
0.7 at F30K lengths) and for all the products the scoring cannot avoid (`pair_flops`).

    python benchmarks/gsmn_eval.py [--images 200] [--captions 1000] [--loop-images 80] [--loop-captions 80]
        [--rounds 3] [--budget 8] [--device cpu|cuda] [--out figures.json]
    OMP_NUM_THREADS=1 python benchmarks/gsmn_eval.py --clock thread ...   # one core, CPU time: robust to load
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the reference port lives in tests/

from tests.gsmn_reference import reference_scores  # noqa: E402

from common import add_clock_argument, chosen_clock, matmul_gflops, synchronised  # noqa: E402
from itmatch.models.base import Encoded  # noqa: E402
from itmatch.models.gsmn import GsmnConfig, build  # noqa: E402

REGIONS, DIM, F30K_PAIRS = 36, 1024, 1000 * 5000


def make_inputs(n_images: int, n_captions: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.rand(n_images, REGIONS, 2048, generator=gen)
    xy = torch.rand(n_images, REGIONS, 2, generator=gen) * 0.8
    boxes = torch.cat([xy, xy + torch.rand(n_images, REGIONS, 2, generator=gen) * 0.2], -1)
    gamma = torch.distributions.Gamma(torch.tensor(4.0), torch.tensor(1 / 1.8))
    torch.manual_seed(seed)
    lengths = (5 + gamma.sample((n_captions,))).round().clamp(max=60).long() + 2
    captions = torch.randint(4, 1000, (n_captions, int(lengths.max())), generator=gen)
    depends = [[[0, 2]] + [[k, k + 1] for k in range(1, n - 2)] for n in lengths.tolist()]
    return feats, boxes, captions, lengths, depends


def pair_flops(lengths: torch.Tensor, blocks: int, hidden: int = 32) -> dict[str, float]:
    """Mean multiply-add flops per pair of the products GSMN's scoring cannot avoid, with L words per caption.

    dots: the region-word products of every block (2 R d L; the raw score is their sum over blocks). The cosines
    need the norm of every attended vector per block; the cheapest exact form is a quadratic form over the
    context's Gram triangle (`graph_matching._attended_sq_norms`): regions attending to words 2 K R L(L+1)/2,
    words attending to regions 2 K L R(R+1)/2 (materialising the attended vectors would cost 2 R d L per
    direction instead). heads: each node's folded structure-level map (2 K hid per node, R + L nodes).
    Since the dot products are only part of this, the dots-only fraction of the roofline is at most dots / all.
    """
    words = lengths.double()
    dots = float((2 * REGIONS * DIM * words).mean())
    regions_to_words = float((blocks * REGIONS * words * (words + 1)).mean())
    words_to_regions = float((blocks * words * REGIONS * (REGIONS + 1)).mean())
    heads = float((2 * blocks * hidden * (REGIONS + words) + 2 * hidden * (REGIONS + words)).mean())
    return {"dots": dots, "regions_to_words": regions_to_words, "words_to_regions": words_to_regions,
            "heads": heads, "all": dots + regions_to_words + words_to_regions + heads}


def run(sparse: bool, args: argparse.Namespace, clock) -> dict:
    torch.manual_seed(0)
    model = build(GsmnConfig(image_dim=2048, embed_dim=DIM, vocab_size=1000, lambda_softmax=20.0, sparse=sparse,
                             xattn_budget_mb=args.budget)).eval().to(args.device)
    feats, boxes, captions, lengths, depends = make_inputs(args.images, args.captions)
    ours_us, loop_us, ratios = [], [], []
    with torch.inference_mode():
        img = model.encode_image(feats.to(args.device), boxes.to(args.device))
        txt = model.encode_text(captions.to(args.device), lengths, depends).packed()
        model.similarity(img.rows(0, 8), Encoded(txt.emb, txt.lengths[:64], txt.offsets[:64]))  # warm-up
        ni, nc = args.loop_images, args.loop_captions
        d = model.cfg.embed_dim
        words = txt.emb.cpu()
        padded = torch.zeros(nc, int(lengths[:nc].max()), d)
        for k in range(nc):
            o, n = int(txt.offsets[k]), int(lengths[k])
            padded[k, :n] = words[o : o + n, :d]
        model_cpu = build(model.cfg).eval()
        model_cpu.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
        for _ in range(args.rounds):  # alternate, so that both sides see the same machine state
            start = clock()
            ours = model.similarity(img, txt)
            ours_us.append(1e6 * (clock() - start) / (args.images * args.captions))
            start = clock()
            ref = reference_scores(model_cpu, img.emb[:ni, :, :d].cpu(), boxes[:ni], padded, lengths[:nc].tolist(),
                                   depends[:nc], shard=80)
            loop_us.append(1e6 * (clock() - start) / (ni * nc))
            ratios.append(loop_us[-1] / ours_us[-1])
    ours_pair, loop_pair = statistics.median(ours_us), statistics.median(loop_us)
    # Roofline: the products per pair at the rate of one large float32 matmul of the dot products' shape, timed
    # on the same clock in this run; once for the region-word dot products alone, once for every product.
    gemm = matmul_gflops(torch.randn(128 * REGIONS, DIM), torch.randn(DIM, 128 * 14), clock=clock)
    flops = pair_flops(lengths[: args.captions], model.cfg.num_block)
    gflops = flops["dots"] / (ours_pair * 1e-6) / 1e9
    all_gflops = flops["all"] / (ours_pair * 1e-6) / 1e9
    return {
        "variant": "sparse" if sparse else "dense",
        "ours_us_per_pair": ours_pair,
        "loop_us_per_pair": loop_pair,
        "ours_f30k_s": ours_pair * F30K_PAIRS / 1e6,
        "loop_f30k_s": loop_pair * F30K_PAIRS / 1e6,
        "speedup": statistics.median(ratios),
        "gflops": gflops, "matmul_roofline_gflops": gemm, "roofline_fraction": gflops / gemm,
        "all_products_gflops": all_gflops, "all_products_roofline_fraction": all_gflops / gemm,
        "flop_per_pair": flops, "dots_share_of_products": flops["dots"] / flops["all"],
        "rounds": {"ours_us": ours_us, "loop_us": loop_us, "speedup": ratios},
        "max_abs_delta": float((ours[:ni, :nc].cpu().double() - ref.double()).abs().max()),
        "ours_pairs_timed": args.images * args.captions,
        "loop_pairs_timed": ni * nc,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--captions", type=int, default=1000)
    ap.add_argument("--loop-images", type=int, default=80)
    ap.add_argument("--loop-captions", type=int, default=80)
    ap.add_argument("--budget", type=float, default=8.0, help="MB for intermediates per tile (speed only)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3, help="alternating timings of both sides; medians are reported")
    add_clock_argument(ap)
    ap.add_argument("--out", help="write the figures as JSON")
    args = ap.parse_args()
    clock = synchronised(chosen_clock(ap, args), args.device)
    if args.clock == "thread" and args.device != "cpu":
        ap.error("--clock thread measures one CPU thread: run it on the CPU")
    rows = [run(sparse, args, clock) for sparse in (False, True)]
    info = {"threads": torch.get_num_threads(), "device": args.device, "torch": torch.__version__, "clock": args.clock,
            "rounds": args.rounds, "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", ""), "rows": rows}
    for r in rows:
        print(f"{r['variant']:6s} ours {r['ours_us_per_pair']:7.1f} us/pair (F30K 1K: {r['ours_f30k_s']:6.0f} s)  "
              f"port of the original loop {r['loop_us_per_pair']:7.1f} us/pair ({r['loop_f30k_s']:6.0f} s)  "
              f"speedup {r['speedup']:5.1f}x  max|delta| {r['max_abs_delta']:.1e}  "
              f"roofline {r['gflops']:.0f}/{r['matmul_roofline_gflops']:.0f} GFLOP/s = {r['roofline_fraction']:.2f} "
              f"(dot products; at most {r['dots_share_of_products']:.2f}), all products "
              f"{r['all_products_gflops']:.0f} GFLOP/s = {r['all_products_roofline_fraction']:.2f}")
    print(f"load average {os.getloadavg()[0]:.1f}, threads {info['threads']}, device {args.device}, "
          f"clock {args.clock}, medians of {args.rounds} alternating rounds")
    if args.out:
        Path(args.out).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
