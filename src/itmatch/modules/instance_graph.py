"""A batch-level cross-modal relation graph over image and caption embeddings (training-time regulariser).

Nodes are the B image and B caption embeddings of a batch, in the order [images; captions]. Edges:

* connection (boolean, no gradient): node a links to node b when b is among the top `int(B * threshold)` of a's
  row, scored by embedding products within a modality and by fragment matching across modalities;
* relevance (weights, with gradient): exp(-||a - b|| / sigma) within a modality; across modalities a small MLP
  on the top-k word-region matches plus their mean.

One transformer layer runs over the 2B nodes with `mask_weight * relevance` added to its attention logits and
-inf on unconnected pairs. A KL term pulls the cross-modal relevance rows towards softmax(exp(-distance)).
This is the "instance-level relation modelling" of HREM (CrossmodalGroup/HREM @ 1ad2612, `graph_lib.py`,
`lib/mca.py`); nothing of it is used to embed or score at test time.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from itmatch.errors import DataError
from itmatch.modules.transformer import post_norm_encoder

# fragment_match's (t2i_mean (T, I), t2i_top (T, I, k), i2t_mean (I, T), i2t_top (I, T, k))
Matches = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def fragment_match(regions: torch.Tensor, words: torch.Tensor, word_lengths: torch.Tensor, topk: int, *,
                   chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Word-region matching of every caption with every image (upstream `AdjacencyLearning`, SCAN mode).

    Args:
        regions: (I, R, D) region features (all R rows, padded ones too, as upstream with `img_len_use` off).
        words: (T, L, D) word features; word_lengths (T,) valid words.
        topk: number of best matches kept per pair (needs R >= topk).

    Returns:
        t2i_mean (T, I), t2i_top (T, I, topk), i2t_mean (I, T), i2t_top (I, T, topk).

    For caption t the first W_t = max(n_t, topk) word rows take part (padded ones too when n_t < topk, as
    upstream), A = leaky_relu(words . regions, 0.1) on l2-normalised vectors; t2i: A normalised over the words,
    max over regions, mean over the n_t words and top-k over the W_t rows; i2t: A normalised over the regions,
    max over the n_t words, mean and top-k over all regions.
    """
    n_img, n_reg, _ = regions.shape
    if n_reg < topk:
        raise DataError(f"the relation graph keeps the top {topk} region matches but images have {n_reg} regions")
    if words.shape[1] < topk:  # upstream would fail in topk; zero word rows match nothing (they normalise to 0)
        words = F.pad(words, (0, 0, 0, topk - words.shape[1]))
    regions = F.normalize(regions, dim=-1)
    words = F.normalize(words, dim=-1)
    lengths = word_lengths.to(words.device)
    rows = torch.arange(words.shape[1], device=words.device)
    t2i_mean, t2i_top, i2t_mean, i2t_top = [], [], [], []
    for s in range(0, len(words), chunk):
        w, n = words[s : s + chunk], lengths[s : s + chunk]  # (t, L, D), (t,)
        used = rows[None, :] < n.clamp(min=topk)[:, None]  # (t, L): the W_t rows upstream slices
        real = rows[None, :] < n[:, None]  # (t, L): the n_t words
        a = F.leaky_relu(torch.einsum("tld,ird->tilr", w, regions), negative_slope=0.1)  # (t, I, L, R)
        a = a * used[:, None, :, None]
        row = F.normalize(a, dim=2).amax(dim=3)  # (t, I, L): best region per word
        t2i_mean.append((row * real[:, None]).sum(dim=2) / n[:, None].to(row.dtype))
        t2i_top.append(row.masked_fill(~used[:, None], float("-inf")).topk(topk, dim=2).values)
        col = F.normalize(a, dim=3).masked_fill(~real[:, None, :, None], float("-inf")).amax(dim=2)  # (t, I, R)
        i2t_mean.append(col.mean(dim=2))
        i2t_top.append(col.topk(topk, dim=2).values)
    return (torch.cat(t2i_mean), torch.cat(t2i_top), torch.cat(i2t_mean).T,
            torch.cat(i2t_top).transpose(0, 1))


def top_fraction(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """(N, M) bool: entries at least as large as the int(M * fraction)-th largest of their row (ties included)."""
    k = max(1, int(scores.shape[1] * fraction))  # upstream: int(M * fraction), which fails for M * fraction < 1
    return scores >= scores.topk(k, dim=1).values[:, -1:]


def relevance_kl(relevance: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(softmax(relevance) || softmax(target)) per row, averaged over rows (upstream `kl_div`, T = 1)."""
    return F.kl_div(F.log_softmax(target, dim=-1), F.softmax(relevance, dim=-1), reduction="batchmean")


class InstanceGraph(nn.Module):
    """The relation graph of a batch; forward returns the enhanced (normalised) embeddings and the KL term."""

    def __init__(self, dim: int, *, nhead: int = 16, dropout: float = 0.1, num_layers: int = 1, topk: int = 10,
                 threshold: float = 0.5, mask_weight: float = 1.0, sigma: float = 1.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.topk, self.threshold, self.mask_weight, self.sigma = topk, threshold, mask_weight, sigma
        # Upstream creates the transformer first, then the t2i MLP, and the i2t MLP as a deep copy (same init).
        self.gnn = post_norm_encoder(dim, nhead, dim, dropout, num_layers, **dd)
        self.mlp_t2i = nn.Sequential(nn.Linear(topk, topk, **dd), nn.ReLU(), nn.Dropout(0.0), nn.Linear(topk, 1, **dd))
        self.mlp_i2t = copy.deepcopy(self.mlp_t2i)

    def relations(self, img: torch.Tensor, cap: torch.Tensor, regions: torch.Tensor | None,
                  words: torch.Tensor | None, word_lengths: torch.Tensor | None,
                  matches: Matches | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(connection (2B, 2B) bool, relevance (2B, 2B), KL regulariser) for node order [images; captions].

        `matches`: `fragment_match` of the batch's regions and words, when computed elsewhere (split over
        processes); regions, words and word_lengths are then not read."""
        with torch.no_grad():
            c_ii = top_fraction(img @ img.T, self.threshold)
            c_tt = top_fraction(cap @ cap.T, self.threshold)
        r_ii = torch.exp(-torch.cdist(img, img) / self.sigma)
        r_tt = torch.exp(-torch.cdist(cap, cap) / self.sigma)
        if matches is None:
            assert regions is not None and words is not None and word_lengths is not None
            matches = fragment_match(regions.detach(), words.detach(), word_lengths, self.topk)
        t2i_mean, t2i_top, i2t_mean, i2t_top = matches
        r_ti = self.mlp_t2i(t2i_top).squeeze(-1) + t2i_mean  # (T, I)
        r_it = self.mlp_i2t(i2t_top).squeeze(-1) + i2t_mean  # (I, T)
        c_ti = top_fraction(t2i_mean, self.threshold)
        c_it = top_fraction(i2t_mean, self.threshold)
        target = torch.exp(-torch.cdist(img, cap) / self.sigma).detach()  # (I, T)
        reg = relevance_kl(r_it, target) + relevance_kl(r_ti, target.T)
        connect = torch.cat([torch.cat([c_ii, c_it], 1), torch.cat([c_ti, c_tt], 1)])
        relevance = torch.cat([torch.cat([r_ii, r_it], 1), torch.cat([r_ti, r_tt], 1)])
        return connect, relevance, reg

    def forward(self, img: torch.Tensor, cap: torch.Tensor, regions: torch.Tensor | None,
                words: torch.Tensor | None, word_lengths: torch.Tensor | None,
                nodes: tuple[torch.Tensor, torch.Tensor] | None = None, matches: Matches | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """img, cap (B, D) normalised embeddings; regions (B, R, D), words (B, L, D) pre-pooling features.

        The relations always use the normalised embeddings; the transformer runs on `nodes` (default: the same;
        upstream `norm_input=0` passes the embeddings before l2norm). Returns (enhanced images (B, D), enhanced
        captions (B, D), KL regulariser).
        """
        connect, relevance, reg = self.relations(img, cap, regions, words, word_lengths, matches)
        mask = self.mask_weight * relevance.masked_fill(~connect, float("-inf"))
        x = torch.cat(nodes if nodes is not None else (img, cap))
        out = self.gnn(x[:, None], mask=mask)[:, 0]  # one sequence of 2B nodes, batch of 1
        img_g, cap_g = out.split(len(img))
        return F.normalize(img_g, dim=-1), F.normalize(cap_g, dim=-1), reg
