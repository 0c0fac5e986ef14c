"""VSE++ — Faghri et al., "VSE++: Improving Visual-Semantic Embeddings with Hard Negatives", BMVC 2018.

Port of github.com/fartashf/vsepp @ abe382f (precomputed-feature path): fc image encoder + l2norm (no eps), a
unidirectional GRU text encoder taking the state at the last valid step + l2norm, dot-product similarity, and the
hinge loss summed or on the hardest negative (`max_violation`).

The original's precomp features are one vector per image (VGG fc7). Given the SCAN layout (N, regions, D), we
mean-pool the regions before the fc (`image_pool="mean"`; fc is linear, so this equals averaging the per-region
embeddings before normalising), the usual mean-pooled BUTD baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from itmatch.models.base import Encoded, RetrievalModel, check_data_sizes
from itmatch.modules.norm import l2norm
from itmatch.modules.text_gru import GruTextEncoder
from itmatch.registry import register_model


@dataclass(frozen=True, slots=True)
class VseppConfig:
    name: Literal["vsepp"] = "vsepp"
    image_dim: int = 0  # 0 = taken from the data at training time
    embed_dim: int = 1024
    word_dim: int = 300
    num_layers: int = 1
    vocab_size: int = 0  # taken from the vocabulary at training time
    no_imgnorm: bool = False
    image_pool: Literal["mean"] = "mean"  # only used when features are (N, regions, D)


class FcImageEncoder(nn.Module):
    """Linear(image_dim, embed_dim), Xavier-uniform weight and zero bias as upstream, then l2norm."""

    def __init__(self, image_dim: int, embed_dim: int, *, no_imgnorm: bool = False, eps: float = 0.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(image_dim, embed_dim, device=device, dtype=dtype)
        self.no_imgnorm = no_imgnorm
        self.eps = eps
        r = math.sqrt(6.0) / math.sqrt(image_dim + embed_dim)
        nn.init.uniform_(self.fc.weight, -r, r)
        nn.init.zeros_(self.fc.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.fc(images)
        return x if self.no_imgnorm else l2norm(x, dim=-1, eps=self.eps)


class Vsepp(RetrievalModel):
    def __init__(self, cfg: VseppConfig, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.img_enc = FcImageEncoder(cfg.image_dim, cfg.embed_dim, no_imgnorm=cfg.no_imgnorm,
                                      device=device, dtype=dtype)
        self.txt_enc = GruTextEncoder(cfg.vocab_size, cfg.word_dim, cfg.embed_dim, num_layers=cfg.num_layers,
                                      output="last", device=device, dtype=dtype)

    def encode_image(self, images: torch.Tensor) -> Encoded:
        if images.ndim == 3:  # (B, R, D) region features -> (B, D)
            images = images.mean(dim=1)
        return Encoded(self.img_enc(images))

    def encode_text(self, captions: torch.Tensor, lengths: torch.Tensor) -> Encoded:
        return Encoded(l2norm(self.txt_enc(captions, lengths), dim=-1))


@register_model("vsepp", VseppConfig)
def build(cfg: VseppConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Vsepp:
    check_data_sizes(cfg)
    return Vsepp(cfg, device=device, dtype=dtype)
