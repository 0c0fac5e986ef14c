"""Worker started by `torchrun` in tests/test_distributed.py (not a test module itself).

    ddp_worker.py grads DATA OUT_FILE       one DDP forward/backward of a global batch; rank 0 saves loss + grads
    ddp_worker.py fit DATA OUT_DIR LOG [--crash-at N] [--resume]
                                            `fit` under torchrun; every checkpoint write is logged with its rank
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

GLOBAL_BATCH = 15  # odd: the two shards differ in size (8 + 7), which exercises the padded all-gather


def tiny_config(data: str, *overrides: str):
    from itmatch.config import load_preset

    return load_preset("vsepp_synth", [f'data.path="{data}"', "model.embed_dim=16", "model.word_dim=8",
                                       f"data.batch_size={GLOBAL_BATCH}", "train.epochs=2", "train.save_every=4",
                                       "train.lr=1e-3", *overrides])


def grads(data: str, out_file: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from itmatch import distributed
    from itmatch.data.precomp import CaptionDataset
    from itmatch.training import _TrainingLoss, build_model, build_recipe, epoch_batches, resolve_config

    info, device = distributed.setup("cpu")
    cfg, split, tokenizer = resolve_config(tiny_config(data))
    torch.manual_seed(0)
    model = build_model(cfg, device)
    ddp = DistributedDataParallel(_TrainingLoss(build_recipe(model, cfg, distributed.gather_with_grad)))
    dataset = CaptionDataset(split, tokenizer)
    global_batch = epoch_batches(len(dataset), GLOBAL_BATCH, 0, 0)[0]
    batch = dataset.batch(distributed.shard(global_batch, info.rank, info.world_size))
    loss = ddp(batch.images, batch.captions, batch.lengths, epoch=0)["loss"]
    loss.backward()
    if info.is_main:
        torch.save({"loss": loss.detach(), "batch": global_batch,
                    "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}},
                   out_file)
    distributed.teardown()


def fit_run(data: str, out_dir: str, log: str, crash_at: int, resume: bool) -> None:
    from itmatch.checkpoints import native
    from itmatch.training import fit

    save = native.save
    rank = os.environ["RANK"]

    def logged_save(obj, path, *args, **kwargs):
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"{rank} {Path(path).name}\n")
        return save(obj, path, *args, **kwargs)

    native.save = logged_save

    def crash(state, stats) -> None:
        if state.global_step == crash_at:
            raise SystemExit(3)

    fit(tiny_config(data), out_dir, resume=resume, on_step=crash if crash_at else None)


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "grads":
        grads(*rest)
        # About one full test run in four, a rank of this mode aborted after its work was done, during interpreter
        # finalization with no Python frame left ("terminate called without an active exception", SIGABRT; seen
        # with PyTorch 2.13 and gloo, never in the `fit` modes). Its results are written by then: leave without
        # finalization so that the exit status reports the work, not the shutdown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    else:
        crash_at = int(rest[rest.index("--crash-at") + 1]) if "--crash-at" in rest else 0
        fit_run(rest[0], rest[1], rest[2], crash_at, "--resume" in rest)
