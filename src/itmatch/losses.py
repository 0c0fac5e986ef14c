"""Losses on a similarity matrix (never on a model): pure functions."""

from __future__ import annotations

import torch


def hinge_loss(sims: torch.Tensor, *, margin: float = 0.2, max_violation: bool = False) -> torch.Tensor:
    """Bidirectional hinge triplet loss of VSE++ (and SCAN, VSRN, VSE-infinity) on a square (B, B) matrix.

    Row i is image i, column j caption j, the diagonal holds the positive pairs. Summed over the batch, not
    averaged, as upstream (the gradient scale matters with gradient clipping at 2.0). With `max_violation` only
    the hardest negative of each row (captions for an image) and each column (images for a caption) counts.
    """
    if sims.ndim != 2 or sims.shape[0] != sims.shape[1]:
        raise ValueError(f"hinge_loss needs a square (B, B) matrix, got {tuple(sims.shape)}")
    pos = sims.diagonal()
    eye = torch.eye(len(sims), dtype=torch.bool, device=sims.device)
    cost_cap = (margin + sims - pos[:, None]).clamp(min=0).masked_fill(eye, 0)  # image i as query
    cost_img = (margin + sims - pos[None, :]).clamp(min=0).masked_fill(eye, 0)  # caption j as query
    if max_violation:  # .max (one index per row), not .amax (which splits the gradient between ties)
        return cost_cap.max(dim=1).values.sum() + cost_img.max(dim=0).values.sum()
    return cost_cap.sum() + cost_img.sum()


def caption_nll(logprobs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked negative log-likelihood of a captioner: summed over tokens, averaged over captions.

    logprobs (B, T, V), targets (B, T) word ids, mask (B, T) weights (1 = token counts). VSRN's
    `LanguageModelCriterion` (misc/utils.py): sum(-logp[target] * mask) / B.
    """
    if logprobs.shape[:2] != targets.shape or targets.shape != mask.shape:
        raise ValueError(f"caption_nll: shapes {tuple(logprobs.shape)}, {tuple(targets.shape)}, {tuple(mask.shape)}")
    nll = -logprobs.gather(2, targets.unsqueeze(2)).squeeze(2)  # (B, T)
    return (nll * mask).sum() / logprobs.shape[0]
