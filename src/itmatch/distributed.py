"""Multi-process training under `torchrun`: process group set-up, the global batch, rank-0-only side effects.

`torchrun --nproc_per_node N -m itmatch train ...` starts N copies of the trainer; each reads the environment
torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), joins the process group (gloo on CPU, NCCL on
GPU) and trains its shard of every global batch inside DistributedDataParallel. Embedding methods mine their
negatives over the global batch: the embeddings of every rank are all-gathered with autograd
(`torch.distributed.nn.functional.all_gather`), so each rank computes the loss of the whole batch and gradients
flow back to the shard that produced each embedding; DDP then averages parameter gradients over ranks, which
makes the update equal to one process training on the concatenated batch.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from itmatch.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (idempotent); returns the rank info and this rank's device.

    With `device = "cuda"` each rank takes the GPU of its LOCAL_RANK; any other device runs on CPU with gloo.
    """
    if not launched_by_torchrun():
        return DistInfo(), torch.device(device)
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise ConfigError("train.device is cuda but no GPU is visible; use --set train.device=cpu")
        if info.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {info.local_rank} but only {torch.cuda.device_count()} GPUs: "
                              "pass --nproc_per_node <= the number of GPUs to torchrun")
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return info, torch.device(f"cuda:{info.local_rank}") if cuda else torch.device(device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `x` (N_r, ...) in rank order; gradients flow back to each rank's own rows.

    Shards may differ in size (the last batch of an epoch): rows are padded to the largest shard for the
    collective and the padding is cut away afterwards.
    """
    if not active():
        return x
    from torch.distributed.nn.functional import all_gather

    size = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    pad = max(counts) - len(x)
    if pad:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    with warnings.catch_warnings():  # torch 2.13 marks it deprecated in favour of a private module; it works
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(x)
    return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)])


def shard(batch: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous slice of a global batch (sizes differ by at most one), so that the rank-ordered
    concatenation of the shards is the global batch itself."""
    base, extra = divmod(len(batch), world_size)
    start = rank * base + min(rank, extra)
    return batch[start : start + base + (rank < extra)]
