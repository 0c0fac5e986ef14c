"""Multi-process training under `torchrun`: process group set-up, the global batch, rank-0-only side effects.

`torchrun --nproc_per_node N -m itmatch train ...` starts N copies of the trainer; each reads the environment
torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), joins the process group (gloo on CPU, NCCL on
GPU) and trains its shard of every global batch inside DistributedDataParallel. Embedding methods mine their
negatives over the global batch: the embeddings of every rank are all-gathered with autograd
(`torch.distributed.nn.functional.all_gather`), so each rank computes the loss of the whole batch and gradients
flow back to the shard that produced each embedding; DDP then averages parameter gradients over ranks, which
makes the update equal to one process training on the concatenated batch.

Cross-attention methods (SCAN, GSMN) gather their captions' per-word features instead (zero-padded to the longest
caption of the global batch, with their lengths) and split the quadratic scoring: each rank scores its own images
against every caption and the rows are all-gathered with autograd, so each pair is scored once and every rank mines
the hardest negatives in the global batch's matrix (`Collective`, `itmatch.recipe.Recipe.similarity`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

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
    if not x.requires_grad:  # ids, lengths, detached features: a plain collective
        counts = Collective().counts(len(x), x.device)
        parts = [x.new_zeros(max(counts), *x.shape[1:]) for _ in counts]
        dist.all_gather(parts, pad_to(x, max(counts), dim=0).contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)])
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


def pad_to(x: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    """`x` zero-padded at the end of `dim` to `width`."""
    pad = width - x.shape[dim]
    if pad <= 0:
        return x
    spec = [0, 0] * (x.ndim - dim - 1) + [0, pad]
    return F.pad(x, spec)


class Collective:
    """What a training recipe needs from the process group; every method is the identity in one process.

    `gather` and `gather_padded` keep autograd (gradients flow back to each rank's own rows, summed over the
    ranks); `counts`, `longest` and `total` are plain collectives.
    """

    @property
    def rank(self) -> int:
        return dist.get_rank() if active() else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if active() else 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.gather(x)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows (N_r, ...) concatenated in rank order, with autograd."""
        return gather_with_grad(x)

    def gather_padded(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """As `gather`, for per-word or per-region features whose length along `dim` differs between ranks: each
        shard is zero-padded to the longest first (the width one process pads the whole batch to)."""
        if not active():
            return x
        return gather_with_grad(pad_to(x, self.longest(x.shape[dim], x.device), dim))

    def counts(self, n: int, device: torch.device | str = "cpu") -> list[int]:
        """Every rank's `n` (its shard size), in rank order."""
        if not active():
            return [n]
        size = torch.tensor([n], device=device)
        sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, size)
        return [int(s) for s in sizes]

    def longest(self, n: int, device: torch.device | str = "cpu") -> int:
        """The largest `n` over ranks."""
        if not active():
            return n
        value = torch.tensor([n], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value)

    def total(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of a detached tensor over ranks."""
        if not active():
            return x.detach()
        out = x.detach().clone()
        dist.all_reduce(out)
        return out



def shard(batch: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous slice of a global batch (sizes differ by at most one), so that the rank-ordered
    concatenation of the shards is the global batch itself."""
    base, extra = divmod(len(batch), world_size)
    start = rank * base + min(rank, extra)
    return batch[start : start + base + (rank < extra)]
