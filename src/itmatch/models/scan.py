"""SCAN — Lee et al., "Stacked Cross Attention for Image-Text Matching", ECCV 2018.

Port of github.com/kuanghuei/SCAN @ 8063557: per-region fc image encoder with l2norm (eps added to the norm),
bi-GRU text encoder with the two directions averaged and per-word l2norm, text-to-image or image-to-text stacked
cross attention (`modules/cross_attention.py`), hinge loss on the batch's cross-attention scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from itmatch.errors import ConfigError
from itmatch.models.base import Encoded, RetrievalModel, check_data_sizes
from itmatch.modules.cross_attention import Aggregation, RawNorm, XAttnConfig, xattn_similarity
from itmatch.modules.norm import l2norm
from itmatch.modules.text_gru import GruTextEncoder
from itmatch.registry import register_model

EPS = 1e-8  # SCAN's l2norm adds 1e-8 to the norm


@dataclass(frozen=True, slots=True)
class ScanConfig:
    name: Literal["scan"] = "scan"
    image_dim: int = 0  # 0 = taken from the data at training time
    embed_dim: int = 1024
    word_dim: int = 300
    num_layers: int = 1
    vocab_size: int = 0  # taken from the vocabulary at training time
    bi_gru: bool = True  # every README command passes --bi_gru
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    precomp_enc_type: Literal["basic", "weight_norm"] = "basic"
    cross_attn: Literal["t2i", "i2t"] = "t2i"
    raw_feature_norm: RawNorm = "clipped_l2norm"
    agg_func: Aggregation = "LogSumExp"
    lambda_lse: float = 6.0
    lambda_softmax: float = 9.0
    xattn_budget_mb: float = 1024.0  # memory for cross-attention intermediates per tile (speed, not results)


class RegionFcEncoder(nn.Module):
    """fc applied to every region, then l2norm per region (SCAN `EncoderImagePrecomp`)."""

    def __init__(self, image_dim: int, embed_dim: int, *, weight_norm: bool = False, no_imgnorm: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        fc = nn.Linear(image_dim, embed_dim, device=device, dtype=dtype)
        if weight_norm:  # upstream: weight_norm(Linear, dim=None), default init, one scalar g
            self.fc = nn.utils.parametrizations.weight_norm(fc, dim=None)
        else:
            r = math.sqrt(6.0) / math.sqrt(image_dim + embed_dim)
            nn.init.uniform_(fc.weight, -r, r)
            nn.init.zeros_(fc.bias)
            self.fc = fc
        self.no_imgnorm = no_imgnorm

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.fc(images)  # (B, R, E)
        return x if self.no_imgnorm else l2norm(x, dim=-1, eps=EPS)


class Scan(RetrievalModel):
    def __init__(self, cfg: ScanConfig, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.img_enc = RegionFcEncoder(cfg.image_dim, cfg.embed_dim, weight_norm=cfg.precomp_enc_type == "weight_norm",
                                       no_imgnorm=cfg.no_imgnorm, device=device, dtype=dtype)
        self.txt_enc = GruTextEncoder(cfg.vocab_size, cfg.word_dim, cfg.embed_dim, num_layers=cfg.num_layers,
                                      bidirectional=cfg.bi_gru, output="all", device=device, dtype=dtype)
        self.xattn = XAttnConfig(direction=cfg.cross_attn, raw_feature_norm=cfg.raw_feature_norm,
                                 agg_func=cfg.agg_func, lambda_softmax=cfg.lambda_softmax, lambda_lse=cfg.lambda_lse)
        self.budget_mb = cfg.xattn_budget_mb

    def encode_image(self, images: torch.Tensor) -> Encoded:
        if images.ndim != 3:
            raise ConfigError(f"scan needs region features (N, regions, dim), got shape {tuple(images.shape)}")
        return Encoded(self.img_enc(images))

    def encode_text(self, captions: torch.Tensor, lengths: torch.Tensor) -> Encoded:
        words = self.txt_enc(captions, lengths)  # (B, L, E), zero beyond each length
        if not self.cfg.no_txtnorm:
            words = l2norm(words, dim=-1, eps=EPS)
        return Encoded(words, lengths)

    def similarity(self, images: Encoded, texts: Encoded) -> torch.Tensor:
        assert texts.lengths is not None
        return xattn_similarity(images.emb, texts.emb, texts.lengths, self.xattn, budget_mb=self.budget_mb,
                                offsets=texts.offsets)


@register_model("scan", ScanConfig)
def build(cfg: ScanConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Scan:
    check_data_sizes(cfg)
    return Scan(cfg, device=device, dtype=dtype)
