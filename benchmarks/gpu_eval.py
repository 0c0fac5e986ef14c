"""Cross-attention similarity matrices on a GPU: absolute times and peak GPU memory (issue 23).

SCAN (t2i LSE, the README's F30K preset) through `xattn_similarity` and GSMN (sparse, full-size random model)
through its `similarity`, on encoded galleries of the Flickr30K 1K shape (1,000 x 5,000) and the COCO 5K shape
(5,000 x 25,000): 36 regions x 1024-d, packed captions of F30K-like lengths, in float32, TF32 and bfloat16.
Each setting runs once to warm up (kernels, allocator) and is then timed `--repeats` times with the device
synchronised; peak memory is `torch.cuda.max_memory_allocated` over the timed runs. Goals (issue 23): COCO 5K
SCAN < 10 s, GSMN < 60 s, F30K 1K SCAN < 1 s.

    python benchmarks/gpu_eval.py [--shapes f30k,coco] [--methods scan,gsmn] [--modes float32,tf32,bfloat16]
        [--repeats 3] [--device cuda] [--out figures.json]
    python benchmarks/gpu_eval.py --device cpu --images 8 --captions 40 ...   # a smoke run of the script itself
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import synchronised  # noqa: E402
from gsmn_eval import make_inputs  # noqa: E402
from itmatch.models.gsmn import GsmnConfig, build  # noqa: E402
from itmatch.modules.cross_attention import xattn_similarity  # noqa: E402
from xattn_eval import SETTINGS, make_data  # noqa: E402

SHAPES = {"f30k": (1000, 5000), "coco": (5000, 25000)}
DTYPES = {"float32": torch.float32, "tf32": torch.float32, "bfloat16": torch.bfloat16}


def timed(fn, device: torch.device, repeats: int) -> tuple[float, list[float], int | None]:
    """Median seconds of `fn()` over `repeats` after a warm-up, the runs, and the peak memory (MB) they used."""
    clock = synchronised(time.perf_counter, device)
    fn()
    clock()  # the warm-up's kernels have finished
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    for _ in range(repeats):
        start = clock()
        fn()
        runs.append(clock() - start)
    peak = round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None
    return statistics.median(runs), runs, peak


def scan_setting(n_images: int, n_captions: int, mode: str, device: torch.device, repeats: int,
                 budget: float) -> dict:
    images, texts = make_data(n_images, n_captions)
    dtype = DTYPES[mode]
    images = images.to(device, dtype)
    emb, lengths, offsets = texts.emb.to(device, dtype), texts.lengths.to(device), texts.offsets.to(device)
    cfg = SETTINGS["t2i"]
    with torch.inference_mode():
        seconds, runs, peak = timed(lambda: xattn_similarity(images, emb, lengths, cfg, offsets=offsets,
                                                             budget_mb=budget), device, repeats)
    return {"seconds": round(seconds, 3), "runs": [round(r, 3) for r in runs], "peak_gpu_mb": peak}


def gsmn_setting(n_images: int, n_captions: int, mode: str, device: torch.device, repeats: int,
                 budget: float) -> dict:
    torch.manual_seed(0)
    model = build(GsmnConfig(image_dim=2048, embed_dim=1024, vocab_size=1000, lambda_softmax=20.0, sparse=True,
                             xattn_budget_mb=budget)).eval().to(device)
    feats, boxes, captions, lengths, depends = make_inputs(n_images, n_captions)
    with torch.inference_mode():
        img = model.encode_image(feats.to(device), boxes.to(device))
        txt = model.encode_text(captions.to(device), lengths, depends).packed()
        dtype = DTYPES[mode]
        model = model.to(dtype)
        img, txt = img.to(device, dtype), txt.to(device, dtype)
        seconds, runs, peak = timed(lambda: model.similarity(img, txt), device, repeats)
    return {"seconds": round(seconds, 3), "runs": [round(r, 3) for r in runs], "peak_gpu_mb": peak}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="f30k,coco")
    ap.add_argument("--methods", default="scan,gsmn")
    ap.add_argument("--modes", default="float32,tf32,bfloat16")
    ap.add_argument("--images", type=int, help="override the shapes' image count (smoke runs)")
    ap.add_argument("--captions", type=int, help="override the shapes' caption count (smoke runs)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=4096.0, help="MB of tile intermediates (GPU memory)")
    ap.add_argument("--out", help="write the figures as JSON")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here")
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "settings": []}
    for shape in args.shapes.split(","):
        ni, nc = SHAPES[shape]
        ni, nc = args.images or ni, args.captions or nc
        for method in args.methods.split(","):
            for mode in args.modes.split(","):
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "tf32"
                run = scan_setting if method == "scan" else gsmn_setting
                try:
                    figures = run(ni, nc, mode, device, args.repeats, args.budget)
                except torch.OutOfMemoryError as err:
                    figures = {"error": f"out of memory: {str(err).splitlines()[0]}"}
                row = {"shape": f"{shape} {ni} x {nc}", "method": method, "mode": mode, **figures}
                result["settings"].append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
