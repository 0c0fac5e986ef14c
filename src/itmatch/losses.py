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


def distance_weights(sims: torch.Tensor, negatives: torch.Tensor, *, cutoff: float, dim: int = 512,
                     min_dist: float = 0.5) -> torch.Tensor:
    """Row-normalised sampling weights of the distance-weighted miner (Wu et al., "Sampling Matters", ICCV 2017).

    For unit vectors d = sqrt(2 - 2 s) (clamped to >= min_dist) and q(d) ~ d^(dim-2) (1 - d^2/4)^((dim-3)/2) is the
    density of distances between random points on the sphere; a negative is weighted by 1/q(d) when d < cutoff,
    else 0. As HREM (`lib/loss.py:TripletLoss`): dim = 512 whatever the embedding size, log-weights of
    non-negatives and of inf/nan entries are 0 and take part in the row maximum subtracted before exp, and so do
    negatives beyond the cutoff: a very far one (large 1/q) can underflow every valid weight of its row to 0.
    No gradient: the weights only choose which negative is used.
    """
    with torch.no_grad():
        dist = (2 - 2 * sims).sqrt().clamp(min=min_dist)
        log_w = (2.0 - dim) * dist.log() - ((dim - 3.0) / 2.0) * (1.0 - 0.25 * dist * dist).log()
        bad = torch.isinf(log_w) | torch.isnan(log_w)
        log_w = torch.where(negatives & ~bad, log_w, 0.0)
        w = (log_w - log_w.amax(dim=1, keepdim=True)).exp() * (negatives & (dist < cutoff))
        return w / (w.sum(dim=1, keepdim=True) + 1e-20)


def _sampled_triplets(sims: torch.Tensor, positives: torch.Tensor, *, cutoff: float, margin: float,
                      generator: torch.Generator | None) -> torch.Tensor:
    anchors, pos = positives.nonzero(as_tuple=True)
    weights = distance_weights(sims, ~positives, cutoff=cutoff)[anchors]
    if len(anchors) == 0 or bool((weights.sum(dim=1) <= 0).any()):
        # Upstream: torch.multinomial raises for a row without any valid negative and the whole direction counts 0.
        return sims.new_zeros((), requires_grad=True)
    neg = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return torch.relu(margin + sims[anchors, neg] - sims[anchors, pos]).sum()


def distance_weighted_triplet_loss(sims: torch.Tensor, image_ids: torch.Tensor, *, cutoff: float = 1.7,
                                   margin: float = 0.2, generator: torch.Generator | None = None) -> torch.Tensor:
    """HREM's triplet loss with distance-weighted negative sampling, summed over both directions.

    sims (B, B): row a = image of pair a, column b = caption b; pairs with the same image id are positives (the
    pair itself and the other captions of its image), all others negatives. For every (anchor, positive) one
    negative is drawn from `distance_weights`, and relu(margin + s(a, neg) - s(a, pos)) is summed; then the same
    with captions as anchors (sims.T). Cutoff 1.7 (upstream: 1.9 for COCO).
    """
    if sims.ndim != 2 or sims.shape[0] != sims.shape[1] or len(image_ids) != len(sims):
        raise ValueError(f"distance_weighted_triplet_loss needs (B, B) sims and B ids, got {tuple(sims.shape)}, "
                         f"{tuple(image_ids.shape)}")
    ids = image_ids.to(sims.device)
    positives = ids[:, None] == ids[None, :]
    kw = {"cutoff": cutoff, "margin": margin, "generator": generator}
    return _sampled_triplets(sims, positives, **kw) + _sampled_triplets(sims.T, positives.T, **kw)
