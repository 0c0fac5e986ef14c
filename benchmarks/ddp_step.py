"""Training step time of a cross-attention method in one process and under torchrun (issue 21).

One step = forward, backward and optimizer step of `Recipe.loss` on a global batch of random region features and
captions (SCAN t2i, max violation), inside DistributedDataParallel when started by torchrun. Under torchrun each
rank takes its contiguous shard of the same global batch and scores its share of the pairs.

    python benchmarks/ddp_step.py [--method scan] [--batch 64] [--steps 8] [--device cpu]
    torchrun --standalone --nproc_per_node 2 benchmarks/ddp_step.py [same options]

Prints (rank 0) the world size, threads per process, and the median and all step times in ms.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="scan", choices=("scan", "gsmn"))
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--image-dim", type=int, default=512)
    parser.add_argument("--embed-dim", type=int, default=256)
    parser.add_argument("--words", type=int, default=14, help="longest caption")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import itmatch.models  # noqa: F401
    from itmatch import distributed
    from itmatch.config import Config, TrainConfig
    from itmatch.recipe import Recipe
    from itmatch.registry import create_model, method_spec
    from itmatch.training import _TrainingLoss

    info, device = distributed.setup(args.device)
    spec = method_spec(args.method)
    cfg = dataclasses.replace(spec.config(), image_dim=args.image_dim, embed_dim=args.embed_dim, vocab_size=1000)
    torch.manual_seed(0)
    model = create_model(cfg, device=device)
    recipe = (spec.recipe or Recipe)(model, Config(model=cfg, train=TrainConfig(max_violation=True)),
                                     distributed.Collective())
    trainer: torch.nn.Module = _TrainingLoss(recipe)
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        trainer = DistributedDataParallel(trainer, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = recipe.optimizer(2e-4)
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(args.batch, args.regions, args.image_dim, generator=gen)
    lengths = torch.randint(6, args.words + 1, (args.batch,), generator=gen)
    captions = torch.randint(4, 1000, (args.batch, args.words), generator=gen)
    rows = distributed.shard(list(range(args.batch)), info.rank, info.world_size)
    own = slice(rows[0], rows[-1] + 1)
    width = int(lengths[own].max())
    batch = (images[own].to(device), captions[own, :width].to(device), lengths[own])
    extra = {}
    if args.method == "gsmn":
        xy = torch.rand(args.batch, args.regions, 2, generator=gen) * 0.7
        extra["boxes"] = torch.cat([xy, xy + 0.2], -1)[own].to(device)
    times = []
    for step in range(args.warmup + args.steps):
        distributed.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = trainer(*batch, epoch=0, **extra)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(1000 * (time.perf_counter() - start))
    if info.is_main:
        print(json.dumps({"method": args.method, "world_size": info.world_size, "threads": torch.get_num_threads(),
                          "device": str(device), "global_batch": args.batch, "median_ms": statistics.median(times),
                          "step_ms": [round(t, 1) for t in times]}))
    distributed.teardown()


if __name__ == "__main__":
    main()
