"""Encode a split with a model and compute its similarity matrix in memory-bounded blocks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from itmatch.data.precomp import CAPTIONS_PER_IMAGE, PrecompSplit, pad_captions
from itmatch.data.tokenizers import CaptionTokenizer
from itmatch.models.base import Encoded, RetrievalModel


def _cat(parts: list[Encoded]) -> Encoded:
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
                  boxes: np.ndarray | None = None) -> Encoded:
    """Encode each distinct image once (the originals encode it five times, once per caption).

    `boxes` (n_images, R, 4), one row per distinct image, goes to models that take them (GSMN).
    """
    rows = image_rows(split)
    parts = []
    for start in tqdm(range(0, len(rows), batch_size), desc="images", disable=not progress, leave=False):
        feats = torch.from_numpy(split.images[np.asarray(rows[start : start + batch_size])]).float()
        extra = {} if boxes is None else {"boxes": torch.from_numpy(boxes[start : start + batch_size]).to(device)}
        parts.append(model.encode_image(feats.to(device), **extra).to("cpu"))
    split.images.release()
    return _cat(parts)


@torch.inference_mode()
def encode_captions(model: RetrievalModel, tokens: Sequence[list[int]], *, batch_size: int = 128,
                    device: torch.device | str = "cpu", progress: bool = False,
                    depends: Sequence | None = None) -> Encoded:
    """Encode captions in batches; `depends` (per caption) goes to models that take dependency pairs (GSMN)."""
    parts = []
    for start in tqdm(range(0, len(tokens), batch_size), desc="captions", disable=not progress, leave=False):
        captions, lengths = pad_captions(list(tokens[start : start + batch_size]))
        extra = {} if depends is None else {"depends": depends[start : start + batch_size]}
        parts.append(model.encode_text(captions.to(device), lengths, **extra).to("cpu"))
    return _cat(parts)


@torch.inference_mode()
def similarity_matrix(model: RetrievalModel, images: Encoded, texts: Encoded, *, chunk: int = 1024,
                      dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> np.ndarray:
    """(n_images, n_captions) float64 scores, computed `chunk` images at a time in `dtype`.

    dtype defaults to the model's `eval_dtype`, the precision its original scored in (float64 for most: they
    copy embeddings into float64 numpy arrays before scoring). Packed per-word features stay in their storage
    dtype; the model casts each tile.
    """
    dtype = dtype or model.eval_dtype
    texts = texts.to(device, None if texts.offsets is not None else dtype)
    out = np.empty((len(images), len(texts)), dtype=np.float64)
    for start in range(0, len(images), chunk):
        block = images.rows(start, start + chunk).to(device, dtype)
        out[start : start + chunk] = model.similarity(block, texts).double().cpu().numpy()
    return out


def encode_split(model: RetrievalModel, split: PrecompSplit, vocab: CaptionTokenizer, *, batch_size: int = 128,
                 device: torch.device | str = "cpu", progress: bool = False, box_compat: str | bool = "",
                 compat_batch_size: int = 64, fold5: bool = False) -> tuple[Encoded, Encoded]:
    """Encode every distinct image and every caption of a split in eval mode (CxC needs the embeddings).

    Models that take boxes (GSMN) also get the split's boxes, normalised correctly or, with `box_compat`,
    as the original evaluation computed them (`box_compat` "release" or "upstream" code, its loader batch
    `compat_batch_size`, its `fold5` row indexing).
    """
    was_training = model.training
    model.eval()
    extra: dict = {}
    if "boxes" in getattr(model, "extra_inputs", ()):
        from itmatch.data.gsmn_files import model_inputs

        extra = model_inputs(split, model.cfg, rows=image_rows(split), box_compat=box_compat,
                             compat_batch_size=compat_batch_size, fold5=fold5)
    images = encode_images(model, split, batch_size=batch_size, device=device, progress=progress,
                           boxes=extra.get("boxes"))
    tokens = extra.get("tokens") or [vocab.encode(c) for c in split.captions]
    texts = encode_captions(model, tokens, batch_size=batch_size, device=device, progress=progress,
                            depends=extra.get("depends"))
    model.train(was_training)
    return images, texts


def compute_sims(model: RetrievalModel, split: PrecompSplit, vocab: CaptionTokenizer, *, batch_size: int = 128,
                 device: torch.device | str = "cpu", progress: bool = False,
                 dtype: torch.dtype | None = None, box_compat: str | bool = "", compat_batch_size: int = 64,
                 fold5: bool = False) -> np.ndarray:
    """Encode a split (each image once) and return its (n_images, n_captions) float64 similarity matrix."""
    was_training = model.training
    model.eval()
    images, texts = encode_split(model, split, vocab, batch_size=batch_size, device=device, progress=progress,
                                 box_compat=box_compat, compat_batch_size=compat_batch_size, fold5=fold5)
    sims = similarity_matrix(model, images, texts, device=device, dtype=dtype)
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
                      dtype: torch.dtype | None = None, box_compat: str | bool = "",
                      compat_batch_size: int = 64) -> np.ndarray:
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
                                 box_compat=box_compat, compat_batch_size=compat_batch_size, fold5=True)
    size = n // folds
    cpi = len(texts) // n
    blocks = [similarity_matrix(model, images.rows(f * size, (f + 1) * size),
                                caption_rows(texts, f * size * cpi, (f + 1) * size * cpi), device=device, dtype=dtype)
              for f in range(folds)]
    model.train(was_training)
    return np.stack(blocks)
