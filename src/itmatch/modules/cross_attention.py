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

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from itmatch.modules.norm import EPS
from itmatch.modules.workspace import Workspace, run_tiles

Direction = Literal["t2i", "i2t"]
RawNorm = Literal["clipped_l2norm", "l2norm", "clipped", "no_norm", "softmax", "l1norm", "clipped_l1norm"]
Aggregation = Literal["LogSumExp", "Mean", "Max", "Sum"]
UNBOUNDED_NORMS = ("clipped", "no_norm")  # raw norms that leave the softmax logits unbounded
# Largest tile (MB of intermediates per CPU thread) whatever the memory budget: past that the element-wise passes
# over a tile stream from main memory instead of the caches, and the matrix products gain nothing (on a 2-core
# EPYC, 1 MB L2 per core: 1024 MB tiles ran at 0.42-0.46 of the GEMM rate, 8-16 MB tiles per thread at 0.75-0.8).
CACHE_TILE_MB_PER_THREAD = 16.0
# Captions per tile are a multiple of this (when there are more): t2i's product has Nc*L columns, and MKL's
# float32 GEMM ran 10-30 % slower when that count was not a multiple of 8 (1224 x 1024 @ 1024 x 561: 67-84
# GFLOP/s on one core, x 568: 97-100; 480 x 1024 @ 1024 x 1116: 93, x 1152: 99).
CAPTION_ALIGN = 8


@dataclass(frozen=True, slots=True)
class XAttnConfig:
    direction: Direction = "t2i"
    raw_feature_norm: RawNorm = "clipped_l2norm"
    agg_func: Aggregation = "LogSumExp"
    lambda_softmax: float = 9.0
    lambda_lse: float = 6.0
    eps: float = EPS


def _raw_norm(a: torch.Tensor, kind: str, qmask: torch.Tensor | None, eps: float, inplace: bool,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Normalise raw scores over the last (query) axis. Never modifies `a`; `out` (in-place mode only) receives
    the result instead of a fresh tensor.

    Padded query items must have zero scores (their vectors are zeroed), so they add nothing to the sums of the
    norms; only the softmax needs `qmask` (1 = valid), since exp(0) is not 0.
    """
    if kind in ("clipped_l2norm", "clipped", "clipped_l1norm"):  # upstream: LeakyReLU(0.1), not the paper's ReLU
        x = F.leaky_relu(a, negative_slope=0.1) if out is None else torch.ops.aten.leaky_relu.out(a, 0.1, out=out)
    elif kind in ("l2norm", "l1norm", "no_norm", "softmax"):
        x = (a.clone() if out is None else out.copy_(a)) if inplace else a
    else:
        raise ValueError(f"unknown raw_feature_norm {kind!r}")
    match kind:
        case "clipped_l2norm" | "l2norm":
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True) + eps
        case "l1norm" | "clipped_l1norm":  # upstream calls an undefined l1norm_d (NameError); the intended norm
            norm = x.abs().sum(-1, keepdim=True) + eps
        case "softmax":
            if qmask is not None:
                x = x.masked_fill(qmask == 0, float("-inf"))
            return torch.softmax(x, dim=-1)
        case _:
            return x
    return x.div_(norm) if inplace else x / norm


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


def _attend(dots: torch.Tensor, context: torch.Tensor, query_norm: torch.Tensor, cmask: torch.Tensor | None,
            qmask: torch.Tensor | None, cfg: XAttnConfig, gram: torch.Tensor | None = None,
            ws: Workspace | None = None) -> torch.Tensor:
    """Cosine of every query item with its attended context, for dots laid out (B, S, X, Q).

    B owns the context items (S of them: `context` is (B, S, d)), X indexes the other modality's items, Q their
    query items. Reductions over S are strided but no tensor is permuted or copied; without autograd the big
    intermediates are updated in place (memory traffic, not arithmetic, bounds this part on CPUs), in `ws`'s
    buffers when given (only then: `xattn_scores` drops it under autograd).
    """
    inplace = not (torch.is_grad_enabled() and (dots.requires_grad or context.requires_grad))
    b, s, x, q = dots.shape
    w = _raw_norm(dots, cfg.raw_feature_norm, qmask, cfg.eps, inplace,
                  None if ws is None else ws.take("weights", dots.shape, dots))
    # softmax over the context axis S. After an l1/l2 norm or a softmax the logits are bounded
    # (|.| <= lambda_softmax) and exp needs no shift; `clipped` and `no_norm` leave them unbounded (un-normalised
    # features, `no_imgnorm`), so the maximum over the valid context items is subtracted, as nn.Softmax does.
    if cfg.raw_feature_norm in UNBOUNDED_NORMS:
        w = w.mul_(cfg.lambda_softmax) if inplace else w * cfg.lambda_softmax  # w is a fresh tensor
        if cmask is not None:  # padded context items get exp(-inf) = 0, not exp(-shift) * 0 (inf * 0 = nan)
            w = w.masked_fill_(cmask == 0, float("-inf")) if inplace else w.masked_fill(cmask == 0, float("-inf"))
        shift = w.amax(1, keepdim=True)
        w = w.sub_(shift).exp_() if inplace else torch.exp(w - shift)
    else:
        w = w.mul_(cfg.lambda_softmax).exp_() if inplace else torch.exp(w * cfg.lambda_softmax)
    if cmask is not None:
        w = w.mul_(cmask) if inplace else w * cmask
    denom = w.sum(1, keepdim=True)
    alpha = w.div_(denom) if inplace else w / denom
    num = (dots.mul_(alpha) if inplace else dots * alpha).sum(1)  # (B, X, Q); dots is not needed afterwards
    if gram is None:
        gram = context_gram(context)
    flat = alpha.reshape(b, s, x * q)
    ga = (torch.bmm(gram, flat) if ws is None else torch.bmm(gram, flat, out=ws.take("gram_alpha", flat.shape, flat))
          ).view(b, s, x, q)
    att_norm = (ga.mul_(alpha) if inplace else ga * alpha).sum(1).clamp_(min=0).sqrt_()  # (B, X, Q)
    return num / (query_norm * att_norm).clamp(min=cfg.eps)


def context_gram(context: torch.Tensor) -> torch.Tensor:
    """(B, S, S) Gram matrices of the context items of each of the B images or captions."""
    return context @ context.transpose(1, 2)


def xattn_scores(images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                 cfg: XAttnConfig, gram: torch.Tensor | None = None,
                 workspace: Workspace | None = None) -> torch.Tensor:
    """Scores of every image with every caption in one tile.

    Args:
        images: (Ni, R, d) region features (all R valid).
        captions: (Nc, L, d) word features, positions >= length ignored.
        lengths: (Nc,) number of valid words per caption.
        gram: the context's `context_gram` if already computed (the images' for t2i, the zero-padded captions'
            for i2t), so that a tile loop computes it once per image or caption rather than once per tile.
        workspace: scratch buffers for the large intermediates, shared by the caller's tiles; used only when no
            gradient is recorded.
    Returns:
        (Ni, Nc) similarity scores.
    """
    ni, r, d = images.shape
    nc, L, _ = captions.shape
    lengths = lengths.to(captions.device)
    wmask = torch.arange(L, device=captions.device)[None, :] < lengths[:, None]  # (Nc, L)
    wmask_f = wmask.to(captions.dtype)
    captions = captions * wmask_f[..., None]  # padding contributes exact zeros to every dot product
    if torch.is_grad_enabled() and (images.requires_grad or captions.requires_grad):
        workspace = None

    def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if workspace is None:
            return a @ b.T
        return torch.mm(a, b.T, out=workspace.take("dots", (a.shape[0], b.shape[0]), a))

    if cfg.direction == "t2i":
        # context = regions of each image, query = words: dots (Ni, R, Nc, L), straight from one matrix product
        dots = product(images.reshape(ni * r, d), captions.reshape(nc * L, d)).view(ni, r, nc, L)
        word_norm = torch.linalg.vector_norm(captions, dim=-1)  # (Nc, L)
        qmask = wmask_f[None, None] if cfg.raw_feature_norm == "softmax" else None
        cos = _attend(dots, images, word_norm[None], None, qmask, cfg, gram, workspace)  # (Ni, Nc, L)
        return _aggregate(cos, cfg, wmask[None], lengths.to(cos.dtype)[None, :])
    # i2t: context = words of each caption, query = regions: dots (Nc, L, Ni, R)
    dots = product(captions.reshape(nc * L, d), images.reshape(ni * r, d)).view(nc, L, ni, r)
    region_norm = torch.linalg.vector_norm(images, dim=-1)  # (Ni, R)
    cos = _attend(dots, captions, region_norm[None], wmask_f[:, :, None, None], None, cfg, gram,
                  workspace)  # (Nc, Ni, R)
    return _aggregate(cos, cfg, None, None).T


def attention_weights(regions: torch.Tensor, words: torch.Tensor, cfg: XAttnConfig) -> torch.Tensor:
    """The attention weights of one image-caption pair, as `xattn_scores` computes them, laid out word x region.

    Args:
        regions: (R, d) region features of one image.
        words: (L, d) word features of one caption (valid words only).
    Returns:
        (L, R) weights. t2i (words attend to regions): row l is word l's softmax over the regions (rows sum to 1).
        i2t (regions attend to words): column r is region r's softmax over the words (columns sum to 1).
    """
    dots = regions @ words.T  # (R, L)
    if cfg.direction == "t2i":  # raw scores normalised over the words (query axis), softmax over the regions
        w = _raw_norm(dots, cfg.raw_feature_norm, None, cfg.eps, inplace=False)
        return torch.softmax(w * cfg.lambda_softmax, dim=0).T
    w = _raw_norm(dots.T, cfg.raw_feature_norm, None, cfg.eps, inplace=False)  # (L, R): over regions, then words
    return torch.softmax(w * cfg.lambda_softmax, dim=0)


def tile_shape(n_images: int, n_captions: int, regions: int, words: int, itemsize: int,
               budget_mb: float) -> tuple[int, int]:
    """Images x captions per tile so that the ~6 live (Ni, Nc, R, L) intermediates fit in `budget_mb`; the
    captions a multiple of `CAPTION_ALIGN` unless that leaves fewer than `CAPTION_ALIGN` or takes them all, the
    images even unless they are all in the tile."""
    per_pair = 6 * regions * max(words, 1) * itemsize
    pairs = max(1, int(budget_mb * 2**20 // per_pair))

    def aligned(tc: int) -> int:
        return tc - tc % CAPTION_ALIGN if CAPTION_ALIGN < tc < n_captions else tc

    tc = aligned(min(n_captions, max(1, int(math.sqrt(pairs)))))
    ti = min(n_images, max(1, pairs // tc))
    if ti == n_images:  # spend what the images leave on more captions
        tc = aligned(min(n_captions, max(1, pairs // ti)))
    elif ti > 1:  # i2t's product has Ni*R columns: with 36 regions an even Ni makes them a multiple of 8
        ti -= ti % 2
    return ti, tc


def length_ordered_tiles(lengths: torch.Tensor, order: torch.Tensor,
                         shape: Callable[[int, int], tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """Caption tiles over the captions sorted longest first (`order`), each padded only to its own longest caption:
    (first position in `order`, captions, images per tile, longest caption). `shape(captions left, longest)` gives
    a tile's (images, captions)."""
    tiles = []
    start = 0
    while start < len(order):
        longest = int(lengths[order[start]])
        ti, tc = shape(len(order) - start, longest)
        tiles.append((start, tc, ti, longest))
        start += tc
    return tiles


def cache_budget_mb(budget_mb: float, device: torch.device, workers: int = 1) -> float:
    """The budget of one tile: `budget_mb` shared by `workers` tiles scored side by side, capped on the CPU at a
    cache-sized tile per thread (each of `workers` tiles has one thread; a lone tile has all of them)."""
    if device.type != "cpu":
        return budget_mb
    threads = 1 if workers > 1 else torch.get_num_threads()
    return min(budget_mb / workers, CACHE_TILE_MB_PER_THREAD * threads)


def gather_words(captions: torch.Tensor, lengths: torch.Tensor, offsets: torch.Tensor | None, cols: torch.Tensor,
                 width: int) -> torch.Tensor:
    """(len(cols), width, d) zero-padded word features of captions `cols`, from padded or packed storage."""
    if offsets is None:
        return captions[cols, :width]
    pos = torch.arange(width, device=captions.device)
    valid = pos[None, :] < lengths[cols][:, None]
    rows = torch.where(valid, offsets[cols][:, None] + pos[None, :], 0)
    return captions[rows] * valid[..., None].to(captions.dtype)


def caption_tiles(captions: torch.Tensor, lengths: torch.Tensor, offsets: torch.Tensor | None, order: torch.Tensor,
                  tiles: list[tuple[int, int, int, int]], *, grad: bool) -> Callable[[tuple[int, int, int, int]],
                                                                                     torch.Tensor]:
    """A function giving a tile of `length_ordered_tiles`' (captions, longest, d) zero-padded word features.

    Without autograd each tile gathers its own captions (memory: one tile at a time). Under autograd a gather or
    slice per tile would cost a backward per tile that writes its gradient into a zero-filled tensor of all the
    captions; the captions are put in tile order with one gather and split, so one backward joins the gradients.
    """
    if not grad:
        return lambda tile: gather_words(captions, lengths, offsets, order[tile[0] : tile[0] + tile[1]].to(
            captions.device), tile[3])
    ordered = gather_words(captions, lengths, offsets, order.to(captions.device), int(lengths.max()))
    chunks = dict(zip([tile[0] for tile in tiles], ordered.split([tile[1] for tile in tiles]), strict=True))
    return lambda tile: chunks[tile[0]][:, : tile[3]]


def xattn_similarity(images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, cfg: XAttnConfig,
                     *, budget_mb: float = 1024.0, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """(Ni, Nc) cross-attention scores computed tile by tile within `budget_mb` of intermediates.

    `captions` is (Nc, L, d) zero-padded, or (sum of lengths, d) packed with `offsets`; each tile is cast to
    the images' dtype. Captions are processed in order of length, so each tile is padded only to its own
    longest caption; the result is scattered back to the input order. Tile size changes no score beyond the
    rounding of the matrix products (their blocking follows the tile's shape).

    Without autograd on the CPU, caption tiles run side by side, one per thread (`run_tiles`), each with its own
    scratch buffers: no fork/join per element-wise pass and no fresh pages per tile.
    """
    ni, r, _ = images.shape
    nc = len(lengths)
    lengths = lengths.to(torch.long).to(captions.device)
    if offsets is not None:
        offsets = offsets.to(torch.long).to(captions.device)
    order = torch.argsort(lengths.cpu(), descending=True, stable=True)
    by_length = images.new_empty((ni, nc))  # columns in `order`, scattered back once at the end
    itemsize = images.element_size()
    # Without autograd, the Gram matrices are computed once per image (t2i) or caption tile (i2t), not once per
    # tile; with autograd the tile computes its own, so the backward graph (and its float sums) stays per tile.
    reuse = not (torch.is_grad_enabled() and (images.requires_grad or captions.requires_grad))
    workers = torch.get_num_threads() if reuse and images.device.type == "cpu" else 1
    image_gram = context_gram(images) if reuse and cfg.direction == "t2i" else None
    budget = cache_budget_mb(budget_mb, images.device, workers)
    tiles = length_ordered_tiles(lengths, order, lambda left, longest: tile_shape(ni, left, r, longest, itemsize,
                                                                                  budget))
    words_of = caption_tiles(captions, lengths, offsets, order, tiles, grad=not reuse)
    # The images in tiles of `ti`, split once per tile height: under autograd one split's backward joins the
    # tiles' gradients, where a slice per tile would write each tile's into a zero-filled tensor of all the images.
    image_tiles = functools.cache(images.split)

    def score(tile: tuple[int, int, int, int], workspace: Workspace) -> None:
        """One caption tile against every image tile."""
        start, tc, ti, _ = tile
        caps = words_of(tile).to(images.dtype)
        lens = lengths[order[start : start + tc].to(lengths.device)]
        caption_gram = context_gram(caps) if reuse and cfg.direction == "i2t" else None
        for i0 in range(0, ni, ti):
            gram = image_gram[i0 : i0 + ti] if image_gram is not None else caption_gram
            by_length[i0 : i0 + ti, start : start + tc] = xattn_scores(image_tiles(ti)[i0 // ti], caps, lens, cfg,
                                                                       gram, workspace)

    run_tiles(score, tiles, workers)
    out = torch.empty_like(by_length)
    out[:, order.to(out.device)] = by_length
    return out
