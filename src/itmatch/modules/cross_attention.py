"""Stacked cross attention (SCAN) for every image x caption pair at once, in memory-bounded tiles.

The original (kuanghuei/SCAN, `xattn_score_t2i/i2t`) loops over captions in Python and, for each caption, runs
attention against all images. Here one tile of images x captions is scored with a single large matrix product
(all region-word dot products), masks instead of slicing (padding never changes a score), and never materialises
the attended vectors: with attention weights alpha over the context items c_s,

    <query_q, sum_s alpha_sq c_s> = sum_s alpha_sq <query_q, c_s>    (reuses the dot products)
    ||sum_s alpha_sq c_s||^2      = alpha_q^T G alpha_q              (G = Gram matrix of the context items)

Semantics (reference spec vsepp_and_scan.md section 3.4-3.6): raw scores normalised over the QUERY axis (words
for t2i, regions for i2t), softmax with temperature lambda_softmax over the CONTEXT axis, cosine between each
query item and its attended vector (clamped at eps), aggregation over query items by LogSumExp (no 1/k, no max
subtraction, as upstream), Mean, Max or Sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Direction = Literal["t2i", "i2t"]
RawNorm = Literal["clipped_l2norm", "l2norm", "clipped", "no_norm", "softmax", "l1norm", "clipped_l1norm"]
Aggregation = Literal["LogSumExp", "Mean", "Max", "Sum"]


@dataclass(frozen=True, slots=True)
class XAttnConfig:
    direction: Direction = "t2i"
    raw_feature_norm: RawNorm = "clipped_l2norm"
    agg_func: Aggregation = "LogSumExp"
    lambda_softmax: float = 9.0
    lambda_lse: float = 6.0
    eps: float = 1e-8


def _raw_norm(a: torch.Tensor, kind: str, qmask: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Normalise raw scores over the last (query) axis; `qmask` marks valid query items."""
    if kind in ("clipped_l2norm", "clipped", "clipped_l1norm"):
        a = F.leaky_relu(a, negative_slope=0.1)  # upstream uses LeakyReLU(0.1), not the paper's ReLU
    if qmask is not None and kind != "softmax":
        a = a * qmask
    match kind:
        case "clipped_l2norm" | "l2norm":
            return a / (a.pow(2).sum(-1, keepdim=True).sqrt() + eps)
        case "l1norm" | "clipped_l1norm":  # upstream calls an undefined l1norm_d (NameError); the intended norm
            return a / (a.abs().sum(-1, keepdim=True) + eps)
        case "softmax":
            if qmask is not None:
                a = a.masked_fill(~qmask, float("-inf"))
            return torch.softmax(a, dim=-1)
        case "clipped" | "no_norm":
            return a
    raise ValueError(f"unknown raw_feature_norm {kind!r}")


def _aggregate(r: torch.Tensor, cfg: XAttnConfig, qmask: torch.Tensor | None,
               counts: torch.Tensor | None) -> torch.Tensor:
    """Pool the per-query-item cosines r (..., Q) into one score."""
    match cfg.agg_func:
        case "LogSumExp":
            e = torch.exp(r * cfg.lambda_lse)
            if qmask is not None:
                e = e * qmask
            return torch.log(e.sum(-1)) / cfg.lambda_lse
        case "Mean":
            if qmask is None:
                return r.mean(-1)
            return (r * qmask).sum(-1) / counts
        case "Max":
            if qmask is not None:
                r = r.masked_fill(~qmask, float("-inf"))
            return r.max(-1).values
        case "Sum":
            return (r * qmask).sum(-1) if qmask is not None else r.sum(-1)
    raise ValueError(f"unknown agg_func {cfg.agg_func!r}")


def xattn_scores(images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                 cfg: XAttnConfig) -> torch.Tensor:
    """Scores of every image with every caption in one tile.

    Args:
        images: (Ni, R, d) region features (all R valid).
        captions: (Nc, L, d) word features, positions >= length ignored.
        lengths: (Nc,) number of valid words per caption.
    Returns:
        (Ni, Nc) similarity scores.
    """
    ni, r, d = images.shape
    nc, L, _ = captions.shape
    wmask = torch.arange(L, device=captions.device)[None, :] < lengths.to(captions.device)[:, None]  # (Nc, L)
    dots = (images.reshape(ni * r, d) @ captions.reshape(nc * L, d).T).view(ni, r, nc, L)
    region_norm = images.pow(2).sum(-1).sqrt()  # (Ni, R)
    word_norm = captions.pow(2).sum(-1).sqrt()  # (Nc, L)
    if cfg.direction == "t2i":
        # context = regions (S = R), query = words (Q = L); layout (Ni, Nc, S, Q)
        a = dots.permute(0, 2, 1, 3).contiguous()
        qmask = wmask[None, :, None, :]
        x = _raw_norm(a, cfg.raw_feature_norm, qmask, cfg.eps)
        alpha = torch.softmax(x * cfg.lambda_softmax, dim=2)  # over regions
        num = (alpha * a).sum(2)  # (Ni, Nc, L)
        gram = images @ images.transpose(1, 2)  # (Ni, R, R)
        ga = torch.einsum("icsq,ist->ictq", alpha, gram)
        att_norm = (ga * alpha).sum(2).clamp(min=0).sqrt()  # (Ni, Nc, L)
        qnorm = word_norm[None]  # (1, Nc, L)
        cos = num / (qnorm * att_norm).clamp(min=cfg.eps)
        counts = lengths.to(cos.dtype).to(cos.device)[None, :]
        return _aggregate(cos, cfg, wmask[None], counts)
    # i2t: context = words (S = L), query = regions (Q = R); layout (Ni, Nc, S, Q)
    a = dots.permute(0, 2, 3, 1).contiguous()
    x = _raw_norm(a, cfg.raw_feature_norm, None, cfg.eps)
    logits = (x * cfg.lambda_softmax).masked_fill(~wmask[None, :, :, None], float("-inf"))
    alpha = torch.softmax(logits, dim=2)  # over words
    num = (alpha * a).sum(2)  # (Ni, Nc, R)
    gram = captions @ captions.transpose(1, 2)  # (Nc, L, L)
    ga = torch.einsum("icsq,cst->ictq", alpha, gram)
    att_norm = (ga * alpha).sum(2).clamp(min=0).sqrt()  # (Ni, Nc, R)
    qnorm = region_norm[:, None, :]  # (Ni, 1, R)
    cos = num / (qnorm * att_norm).clamp(min=cfg.eps)
    return _aggregate(cos, cfg, None, None)


def tile_shape(n_images: int, n_captions: int, regions: int, words: int, itemsize: int,
               budget_mb: float) -> tuple[int, int]:
    """Images x captions per tile so that the ~6 live (Ni, Nc, R, L) intermediates fit in `budget_mb`."""
    per_pair = 6 * regions * max(words, 1) * itemsize
    pairs = max(1, int(budget_mb * 2**20 // per_pair))
    tc = min(n_captions, max(1, int(math.sqrt(pairs))))
    ti = min(n_images, max(1, pairs // tc))
    if ti == n_images:  # spend what the images leave on more captions
        tc = min(n_captions, max(1, pairs // ti))
    return ti, tc


def xattn_similarity(images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, cfg: XAttnConfig,
                     *, budget_mb: float = 1024.0) -> torch.Tensor:
    """(Ni, Nc) cross-attention scores computed tile by tile within `budget_mb` of intermediates.

    Captions are processed in order of length, so each tile is padded only to its own longest caption; the
    result is scattered back to the input order. Tile size never changes a score (pairs are independent).
    """
    ni, r, _ = images.shape
    nc = captions.shape[0]
    lengths = lengths.to(torch.long)
    order = torch.argsort(lengths.cpu(), descending=True, stable=True)
    out = images.new_empty((ni, nc))
    itemsize = images.element_size()
    start = 0
    while start < nc:
        longest = int(lengths[order[start]])
        ti, tc = tile_shape(ni, nc - start, r, longest, itemsize, budget_mb)
        cols = order[start : start + tc].to(captions.device)
        caps = captions[cols, :longest]
        lens = lengths[cols]
        for i0 in range(0, ni, ti):
            out[i0 : i0 + ti, cols] = xattn_scores(images[i0 : i0 + ti], caps, lens, cfg)
        start += tc
    return out
