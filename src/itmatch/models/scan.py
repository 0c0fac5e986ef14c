"""SCAN — Lee et al., "Stacked Cross Attention for Image-Text Matching", ECCV 2018.

Port of github.com/kuanghuei/SCAN @ 8063557: per-region fc image encoder with l2norm (eps added to the norm),
bi-GRU text encoder with the two directions averaged and per-word l2norm, text-to-image or image-to-text stacked
cross attention (`modules/cross_attention.py`), hinge loss on the batch's cross-attention scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from itmatch.checkpoints.official import is_two_encoder_release, option, split_state
from itmatch.config import non_negative, positive
from itmatch.errors import CheckpointError, ConfigError
from itmatch.method import Importer, MethodSpec
from itmatch.models.base import Encoded, RetrievalModel, check_data_sizes
from itmatch.modules.cross_attention import Aggregation, RawNorm, XAttnConfig, attention_weights, xattn_similarity
from itmatch.modules.norm import EPS, l2norm
from itmatch.modules.text_gru import GruTextEncoder
from itmatch.registry import register_method


@dataclass(frozen=True, slots=True)
class ScanConfig:
    name: Literal["scan"] = "scan"
    image_dim: int = non_negative(0)  # 0 = taken from the data at training time
    embed_dim: int = positive(1024)
    word_dim: int = positive(300)
    num_layers: int = positive(1)
    vocab_size: int = non_negative(0)  # taken from the vocabulary at training time
    bi_gru: bool = True  # every README command passes --bi_gru
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    precomp_enc_type: Literal["basic", "weight_norm"] = "basic"
    cross_attn: Literal["t2i", "i2t"] = "t2i"
    raw_feature_norm: RawNorm = "clipped_l2norm"
    agg_func: Aggregation = "LogSumExp"
    lambda_lse: float = positive(6.0)
    lambda_softmax: float = positive(9.0)
    xattn_budget_mb: float = positive(1024.0)  # memory for cross-attention intermediates per tile (speed, not results)


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


def build(cfg: ScanConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Scan:
    check_data_sizes(cfg)
    return Scan(cfg, device=device, dtype=dtype)

# ------------------------------------------------------------------------ released checkpoints of the original
# Import kuanghuei/SCAN checkpoints (`model_best.pth.tar`): pure remapping to `ScanConfig` + our state dict.


def detect(ckpt: Any) -> bool:
    """A SCAN release: two encoder states, options with SCAN's cross-attention settings."""
    if not is_two_encoder_release(ckpt):
        return False
    return hasattr(ckpt["opt"], "cross_attn") and hasattr(ckpt["opt"], "lambda_softmax")


def convert(official: dict[str, Any], where: str = "checkpoint") -> tuple[ScanConfig, dict[str, torch.Tensor]]:
    """(config, state dict) from an original SCAN checkpoint; sizes come from the tensors, options from `opt`."""
    opt = official["opt"]
    img_sd, txt_sd = split_state(official, where)
    if "embed.weight" not in txt_sd or not any(k.startswith("fc.") for k in img_sd):
        raise CheckpointError(f"{where}: not a SCAN checkpoint (expected fc.* image keys and embed.weight)")
    vocab_size, word_dim = txt_sd["embed.weight"].shape
    weight_norm = "fc.weight_v" in img_sd
    fc_weight = img_sd["fc.weight_v" if weight_norm else "fc.weight"]
    embed_dim, image_dim = fc_weight.shape
    cfg = ScanConfig(
        image_dim=int(image_dim), embed_dim=int(embed_dim), word_dim=int(word_dim), vocab_size=int(vocab_size),
        num_layers=int(getattr(opt, "num_layers", 1)), bi_gru=any(k.endswith("_reverse") for k in txt_sd),
        no_imgnorm=bool(getattr(opt, "no_imgnorm", False)), no_txtnorm=bool(getattr(opt, "no_txtnorm", False)),
        precomp_enc_type="weight_norm" if weight_norm else "basic", cross_attn=option(opt, "cross_attn", str),
        raw_feature_norm=option(opt, "raw_feature_norm", str), agg_func=option(opt, "agg_func", str),
        lambda_lse=option(opt, "lambda_lse", float), lambda_softmax=option(opt, "lambda_softmax", float),
    )
    renames = {"fc.weight_g": "fc.parametrizations.weight.original0",
               "fc.weight_v": "fc.parametrizations.weight.original1"}
    state = {f"img_enc.{renames.get(k, k)}": v for k, v in img_sd.items()}
    if weight_norm:  # torch 0.3 stored g with shape (1,) or (); the parametrization wants ()
        key = "img_enc.fc.parametrizations.weight.original0"
        state[key] = state[key].reshape(())
    state |= {f"txt_enc.{k}": v for k, v in txt_sd.items()}
    return cfg, state


def attention_maps(model: Scan, images: torch.Tensor, captions: torch.Tensor,
                   lengths: torch.Tensor) -> dict[str, Any]:
    """Word -> region attention of one image (1, R, D) and one caption (1, L) for the web page: the direction and
    the (L, R) weights, computed in float64."""
    regions = model.encode_image(images).emb[0]  # (R, E)
    words = model.encode_text(captions, lengths).emb[0]  # (L, E)
    return {"direction": model.xattn.direction,
            "weights": attention_weights(regions.double(), words.double(), model.xattn)}


SPEC = register_method(MethodSpec(
    name="scan", config=ScanConfig, build=build,
    importers=(Importer(detect, convert, priority=20),),
    neutral_keys=frozenset({"xattn_budget_mb"}), memory_budget_key="xattn_budget_mb",
    attention=attention_maps,
))
