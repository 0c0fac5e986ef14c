"""Encode a split with a model and compute its similarity matrix in memory-bounded blocks."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from itmatch.data.layout import CAPTIONS_PER_IMAGE
from itmatch.data.precomp import PrecompSplit, pad_captions
from itmatch.data.tokenize import CaptionTokenizer
from itmatch.errors import DataError
from itmatch.method import SplitInputs
from itmatch.models.base import Encoded, RetrievalModel
from itmatch.registry import method_spec

# Runs between encoding and scoring: (images, texts, scoring dtype, pairs to score) -> images per `similarity`
# call (so that a progress bar advances), or None for the default chunks and no bar.
BeforeScoring = Callable[[Encoded, Encoded, torch.dtype, int], "int | None"]


def concat_encoded(parts: list[Encoded]) -> Encoded:
    """Concatenate encoder outputs; per-word features with lengths are packed (no padding kept)."""
    if parts[0].emb.ndim == 2:
        return Encoded(torch.cat([p.emb for p in parts]))
    if parts[0].lengths is not None:
        packed = [p.packed() for p in parts]
        lengths = torch.cat([p.lengths for p in packed])
        return Encoded(torch.cat([p.emb for p in packed]), lengths, torch.cumsum(lengths, 0) - lengths)
    width = max(p.emb.shape[1] for p in parts)
    return Encoded(torch.cat([F.pad(p.emb, (0, 0, 0, width - p.emb.shape[1])) for p in parts]))


def image_rows(split: PrecompSplit) -> list[int]:
    """Feature row of each distinct image covered by the split's captions."""
    return [split.image_of(CAPTIONS_PER_IMAGE * i) for i in range(split.n_images)]


@torch.inference_mode()
def encode_images(model: RetrievalModel, split: PrecompSplit, *, batch_size: int = 128,
                  device: torch.device | str = "cpu", progress: bool = False,
                  inputs: Mapping[str, Any] | None = None) -> Encoded:
    """Encode each distinct image once (the originals encode it five times, once per caption).

    `inputs` are the model's extra per-image inputs (e.g. GSMN's boxes (n_images, R, 4)), one row per distinct image.
    """
    rows = image_rows(split)
    parts = []
    for start in tqdm(range(0, len(rows), batch_size), desc="images", disable=not progress, leave=False):
        feats = torch.from_numpy(split.images[np.asarray(rows[start : start + batch_size])]).float()
        if not torch.isfinite(feats).all():
            row = rows[start + int(torch.nonzero(~torch.isfinite(feats).flatten(1).all(1))[0])]
            raise DataError(f"{split.images.path}: image row {row} has NaN or infinite features; fix or drop it "
                            "(`itmatch data check` lists every problem)")
        extra = {k: torch.from_numpy(np.asarray(v[start : start + batch_size])).to(device)
                 for k, v in (inputs or {}).items()}
        parts.append(model.encode_image(feats.to(device), **extra).to("cpu"))
    split.images.release()
    return concat_encoded(parts)


@torch.inference_mode()
def encode_captions(model: RetrievalModel, tokens: Sequence[list[int]], *, batch_size: int = 128,
                    device: torch.device | str = "cpu", progress: bool = False,
                    inputs: Mapping[str, Sequence] | None = None) -> Encoded:
    """Encode captions in batches; `inputs` are the model's extra per-caption inputs (e.g. GSMN's dependency
    pairs), one entry per caption."""
    parts = []
    for start in tqdm(range(0, len(tokens), batch_size), desc="captions", disable=not progress, leave=False):
        captions, lengths = pad_captions(list(tokens[start : start + batch_size]))
        extra = {k: v[start : start + batch_size] for k, v in (inputs or {}).items()}
        parts.append(model.encode_text(captions.to(device), lengths, **extra).to("cpu"))
    return concat_encoded(parts)


@torch.inference_mode()
def similarity_matrix(model: RetrievalModel, images: Encoded, texts: Encoded, *, chunk: int = 1024,
                      dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                      progress: bool = False) -> np.ndarray:
    """(n_images, n_captions) float64 scores, computed `chunk` images at a time in `dtype`.

    dtype defaults to the method's `eval_dtype`, the precision its original scored in (float64 for most: they
    copy embeddings into float64 numpy arrays before scoring). Packed per-word features stay in their storage
    dtype; the model casts each tile. `progress` shows a bar with an ETA over chunks of `chunk` images.
    """
    dtype = dtype or method_spec(model.cfg.name).eval_dtype
    texts = texts.to(device, None if texts.offsets is not None else dtype)
    out = np.empty((len(images), len(texts)), dtype=np.float64)
    bar = tqdm(total=len(images), desc="scoring", unit="image", disable=not progress, leave=False)
    for start in range(0, len(images), chunk):
        block = images.rows(start, start + chunk).to(device, dtype)
        out[start : start + chunk] = model.similarity(block, texts).double().cpu().numpy()
        bar.update(len(block))
    bar.close()
    return out


def encode_split(model: RetrievalModel, split: PrecompSplit, vocab: CaptionTokenizer, *, batch_size: int = 128,
                 device: torch.device | str = "cpu", progress: bool = False,
                 options: Mapping[str, Any] | None = None) -> tuple[Encoded, Encoded]:
    """Encode every distinct image and every caption of a split in eval mode (CxC needs the embeddings).

    A method that reads more than features and word ids (its spec's `inputs`, e.g. GSMN's boxes) gets them from
    the split; `options` are evaluation options its spec accepts (GSMN: `box_compat`, `box_compat_batch`) and
    `fold5`.
    """
    was_training = model.training
    model.eval()
    provider = method_spec(model.cfg.name).inputs(model.cfg)
    found = SplitInputs()
    if provider is not None:
        found = provider.for_split(split, rows=image_rows(split), options=options)
    images = encode_images(model, split, batch_size=batch_size, device=device, progress=progress,
                           inputs=found.images)
    tokens = found.token_ids or [vocab.encode(c) for c in split.captions]
    texts = encode_captions(model, tokens, batch_size=batch_size, device=device, progress=progress,
                            inputs=found.captions)
    model.train(was_training)
    return images, texts


def compute_sims(model: RetrievalModel, split: PrecompSplit, vocab: CaptionTokenizer, *, batch_size: int = 128,
                 device: torch.device | str = "cpu", progress: bool = False,
                 dtype: torch.dtype | None = None, options: Mapping[str, Any] | None = None,
                 before_scoring: BeforeScoring | None = None) -> np.ndarray:
    """Encode a split (each image once) and return its (n_images, n_captions) float64 similarity matrix.

    `before_scoring(images, texts, dtype, pairs)` runs between encoding and scoring (`itmatch eval`'s cost
    estimate); it returns the number of images per `similarity` call (progress granularity), or None.
    """
    was_training = model.training
    model.eval()
    images, texts = encode_split(model, split, vocab, batch_size=batch_size, device=device, progress=progress,
                                 options=options)
    dtype = dtype or method_spec(model.cfg.name).eval_dtype
    chunk = before_scoring(images, texts, dtype, len(images) * len(texts)) if before_scoring else None
    sims = similarity_matrix(model, images, texts, device=device, dtype=dtype, chunk=chunk or 1024,
                             progress=progress and chunk is not None)
    model.train(was_training)
    return sims


def caption_rows(texts: Encoded, start: int, stop: int) -> Encoded:
    """Captions start..stop-1 of an encoded gallery, padded or packed (packed ones are stored in order)."""
    if texts.offsets is None:
        return texts.rows(start, stop)
    first = int(texts.offsets[start])
    end = int(texts.offsets[stop - 1] + texts.lengths[stop - 1]) if stop > start else first
    return Encoded(texts.emb[first:end], texts.lengths[start:stop], texts.offsets[start:stop] - first)


def compute_fold_sims(model: RetrievalModel, split: PrecompSplit, vocab: CaptionTokenizer, *, folds: int = 5,
                      batch_size: int = 128, device: torch.device | str = "cpu", progress: bool = False,
                      dtype: torch.dtype | None = None, options: Mapping[str, Any] | None = None,
                      before_scoring: BeforeScoring | None = None) -> np.ndarray:
    """(folds, n_images / folds, captions of a fold) float64: each fold's images scored against its own captions.

    The 5-fold protocol (COCO 1K) only reads these diagonal blocks of the full matrix, so the other 4/5 of the
    pairs are never scored. The split is encoded once, as a whole, so the scores equal the full matrix's blocks
    (GSMN's `box_compat` rows depend on the whole split, as in the original's fold-5 evaluation).
    """
    n = split.n_images
    if n % folds:
        raise ValueError(f"{folds}-fold evaluation needs a multiple of {folds} images, got {n}")
    was_training = model.training
    model.eval()
    images, texts = encode_split(model, split, vocab, batch_size=batch_size, device=device, progress=progress,
                                 options={**(options or {}), "fold5": True})
    size = n // folds
    cpi = len(texts) // n
    dtype = dtype or method_spec(model.cfg.name).eval_dtype
    chunk = None
    if before_scoring:  # calibrated on the first fold, for the five folds' pairs
        chunk = before_scoring(images.rows(0, size), caption_rows(texts, 0, size * cpi), dtype,
                               folds * size * size * cpi)
    blocks = [similarity_matrix(model, images.rows(f * size, (f + 1) * size),
                                caption_rows(texts, f * size * cpi, (f + 1) * size * cpi), device=device, dtype=dtype,
                                chunk=chunk or 1024, progress=progress and chunk is not None)
              for f in range(folds)]
    model.train(was_training)
    return np.stack(blocks)
