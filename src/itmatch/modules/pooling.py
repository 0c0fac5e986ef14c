"""Poolings of variable-length sets of vectors (regions, words) into one vector: top-k mean and masked mean."""

from __future__ import annotations

import torch


def valid_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) bool, True for the first lengths[b] positions of row b."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


def topk_mean_pool(x: torch.Tensor, lengths: torch.Tensor, k: int, *, carry_k: bool = True) -> torch.Tensor:
    """(B, L, D) -> (B, D): per dimension, the mean of the k largest values among the first lengths[b] vectors.

    A set with fewer than k vectors uses k = its length. With `carry_k` (the HREM original, `maxk_pool1d_var`) that
    smaller k is also kept for every later row of the batch, because the loop overwrites its own k: row b uses
    k_b = min(k, lengths[0], ..., lengths[b]). It only matters for sets of one vector (k = 2), never at test time.
    """
    lengths = lengths.to(x.device)
    kk = min(k, x.shape[1])
    scores = x.masked_fill(~valid_mask(lengths, x.shape[1])[..., None], float("-inf"))
    top = scores.topk(kk, dim=1).values  # (B, kk, D), descending
    k_row = lengths.clamp(max=k)
    if carry_k:
        k_row = torch.cummin(k_row, dim=0).values
    take = torch.arange(kk, device=x.device)[None, :] < k_row[:, None]  # (B, kk)
    return torch.where(take[..., None], top, 0.0).sum(dim=1) / k_row[:, None].to(x.dtype)


def masked_mean_pool(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, L, D) -> (B, D): mean of the first lengths[b] vectors of each row."""
    lengths = lengths.to(x.device)
    keep = valid_mask(lengths, x.shape[1])[..., None]
    return torch.where(keep, x, 0.0).sum(dim=1) / lengths[:, None].to(x.dtype)
