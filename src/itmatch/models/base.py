"""The interface every method implements: encode_image / encode_text / similarity (+ its training loss)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from itmatch.distributed import gather_with_grad
from itmatch.errors import CheckpointError, ConfigError
from itmatch.losses import hinge_loss


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
    """Base class: embedding models implement `similarity` as a dot product; cross-attention models override it."""

    margin: float = 0.2
    max_violation: bool = False
    # training_loss mines negatives over `global_batch` embeddings, so torchrun training equals one process on the
    # concatenated batch; a method whose loss needs more of the batch (per-word features) sets this False.
    global_batch_loss: bool = True
    # Batch fields `training_loss` also takes, by name (GSMN: "boxes", "depends"; HREM: "image_ids").
    extra_inputs: tuple[str, ...] = ()
    # Dtype evaluation scores pairs in by default: the originals copy embeddings into float64 numpy arrays and score
    # them there (or in float64 torch tensors made from them); GSMN casts each shard back to float32.
    eval_dtype: torch.dtype = torch.float64

    def encode_image(self, images: torch.Tensor) -> Encoded:
        raise NotImplementedError

    def encode_text(self, captions: torch.Tensor, lengths: torch.Tensor) -> Encoded:
        raise NotImplementedError

    def similarity(self, images: Encoded, texts: Encoded) -> torch.Tensor:
        """(N_img, N_txt) scores."""
        return images.emb @ texts.emb.T

    def selection_score(self, results: dict) -> float:
        """Model selection criterion on dev results: rsum, as most originals."""
        return float(results["rsum"])

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """The method's optimizer; the loop rescales every group's lr by 0.1 ** (epoch // lr_update)."""
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=lr)

    def on_epoch_start(self, epoch: int) -> None:
        """Hook for per-epoch switches of the originals (e.g. hardest negatives after a warm-up)."""

    def on_step_start(self, step: int, steps: int) -> None:
        """Hook before training step `step` (0-based) of an epoch of `steps` steps (e.g. a loss warm-up)."""

    def training_state_dict(self) -> dict:
        """Training-only weights kept out of `state_dict()` (e.g. VSRN's caption branch); saved for exact resume."""
        return {}

    def load_training_state_dict(self, state: dict) -> None:
        """Restore what `training_state_dict` returned."""
        if state:
            raise CheckpointError(f"{type(self).__name__} has no training-only state, got {sorted(state)}")

    @classmethod
    def is_embedding_model(cls) -> bool:
        """True when similarity is the dot product of pooled embeddings (what can be indexed and all-gathered)."""
        return cls.similarity is RetrievalModel.similarity

    @classmethod
    def trains_distributed(cls) -> bool:
        """Whether torchrun training reproduces one process on the global batch (dot-product methods whose loss
        sees only pooled embeddings)."""
        return cls.is_embedding_model() and cls.global_batch_loss

    def global_batch(self, emb: torch.Tensor) -> torch.Tensor:
        """Pooled (B_local, D) embeddings -> the global batch's under torchrun training (every rank's, in rank
        order, gradients flowing back to this rank's rows), so negatives are mined over the whole batch."""
        return gather_with_grad(emb) if self.training else emb

    def set_loss(self, *, margin: float, max_violation: bool) -> None:
        self.margin, self.max_violation = margin, max_violation

    def training_loss(self, images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                      *, epoch: int, image_lengths: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Loss terms for one batch (pairs on the diagonal); key "loss" is what is minimised.

        `image_lengths` (B,) counts the valid regions when training drops regions (`train.region_drop`); it is
        then passed on to `encode_image(images, image_lengths)`.
        """
        encoded = self.encode_image(images) if image_lengths is None else self.encode_image(images, image_lengths)
        texts = self.encode_text(captions, lengths)
        if self.is_embedding_model():
            encoded, texts = Encoded(self.global_batch(encoded.emb)), Encoded(self.global_batch(texts.emb))
        sims = self.similarity(encoded, texts)
        return {"loss": hinge_loss(sims, margin=self.margin, max_violation=self.max_violation)}
