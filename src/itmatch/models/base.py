"""The interface every model implements: encode_image / encode_text / similarity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from itmatch.errors import ConfigError


@dataclass(frozen=True)
class Encoded:
    """Encoder output: pooled (N, D) embeddings, per-region/per-word (N, L, D) features with lengths, or
    the same features packed back to back, (sum of lengths, D) with `offsets` (item k = rows offsets[k] ...
    offsets[k] + lengths[k] - 1), which is how large caption galleries are kept without padding."""

    emb: torch.Tensor
    lengths: torch.Tensor | None = None
    offsets: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.lengths) if self.offsets is not None else len(self.emb)

    def rows(self, start: int, stop: int) -> Encoded:
        assert self.offsets is None, "rows() of packed features is not supported"
        lengths = None if self.lengths is None else self.lengths[start:stop]
        emb = self.emb[start:stop]
        if lengths is not None and emb.ndim == 3 and len(lengths):
            emb = emb[:, : int(lengths.max())]
        return Encoded(emb, lengths)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Encoded:
        lengths = None if self.lengths is None else self.lengths.to(device)
        offsets = None if self.offsets is None else self.offsets.to(device)
        return Encoded(self.emb.to(device, dtype), lengths, offsets)

    def padded(self) -> Encoded:
        """Per-item features as (N, L, D) zero-padded with lengths (a no-op unless packed): a method's
        `similarity` may receive packed caption galleries at evaluation and can pad them with this."""
        if self.offsets is None:
            return self
        assert self.lengths is not None
        lengths = self.lengths.to(torch.long)
        width = int(lengths.max()) if len(lengths) else 0
        out = self.emb.new_zeros(len(lengths), width, self.emb.shape[-1])
        keep = torch.arange(width, device=self.emb.device)[None, :] < lengths.to(self.emb.device)[:, None]
        index = (self.offsets.to(torch.long).to(self.emb.device)[:, None]
                 + torch.arange(width, device=self.emb.device)[None, :])[keep]
        out[keep] = self.emb[index]
        return Encoded(out, self.lengths)

    def packed(self) -> Encoded:
        """Per-item features without padding (no-op for pooled or already packed features)."""
        if self.offsets is not None or self.lengths is None or self.emb.ndim != 3:
            return self
        keep = torch.arange(self.emb.shape[1], device=self.emb.device)[None, :] < self.lengths[:, None]
        offsets = torch.cumsum(self.lengths, 0) - self.lengths
        return Encoded(self.emb[keep], self.lengths, offsets)


def check_data_sizes(cfg: Any, *, vocab: bool = True) -> None:
    """Refuse a config whose data-dependent sizes (filled in by `itmatch train`) are still unset."""
    if vocab and cfg.vocab_size <= 0:
        raise ConfigError(f"{cfg.name}: model.vocab_size must be > 0 (it is set from the vocabulary when training)")
    if cfg.image_dim <= 0:
        raise ConfigError(f"{cfg.name}: model.image_dim must be > 0 (it is set from the data when training)")


class RetrievalModel(nn.Module):
    """Base class: encoders and a similarity. Embedding models implement `similarity` as a dot product (the default);
    cross-attention models override it. How a model trains is its method's `Recipe`, not part of the module.

    Every model keeps its frozen config as `self.cfg` (the registry finds its method spec by `cfg.name`)."""

    cfg: Any

    def encode_image(self, images: torch.Tensor) -> Encoded:
        raise NotImplementedError

    def encode_text(self, captions: torch.Tensor, lengths: torch.Tensor) -> Encoded:
        raise NotImplementedError

    def similarity(self, images: Encoded, texts: Encoded) -> torch.Tensor:
        """(N_img, N_txt) scores."""
        return images.emb @ texts.emb.T

    @classmethod
    def is_embedding_model(cls) -> bool:
        """True when similarity is the dot product of pooled embeddings (what can be indexed and all-gathered)."""
        return cls.similarity is RetrievalModel.similarity
