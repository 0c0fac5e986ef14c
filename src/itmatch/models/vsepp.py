"""VSE++ — Faghri et al., "VSE++: Improving Visual-Semantic Embeddings with Hard Negatives", BMVC 2018.

Port of github.com/fartashf/vsepp @ abe382f (precomputed-feature path): fc image encoder + l2norm (no eps), a
unidirectional GRU text encoder taking the state at the last valid step + l2norm, dot-product similarity, and the
hinge loss summed or on the hardest negative (`max_violation`).

The original's precomp features are one vector per image (VGG fc7). Given the SCAN layout (N, regions, D), we
mean-pool the regions before the fc (`image_pool="mean"`; fc is linear, so this equals averaging the per-region
embeddings before normalising), the usual mean-pooled BUTD baseline. With `backbone` set, the image encoder is
the original's CNN on raw images (`EncoderImageFull`: average-pooled ResNet, fc, l2norm; frozen unless `finetune`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from itmatch.errors import ConfigError, DataError
from itmatch.method import MethodSpec
from itmatch.models.base import Encoded, RetrievalModel, check_data_sizes
from itmatch.modules.backbones import (
    backbone_ddp_refusal,
    backbone_normalisation,
    create_backbone,
    load_backbone_weights,
)
from itmatch.modules.norm import l2norm
from itmatch.modules.text_gru import GruTextEncoder
from itmatch.registry import register_method


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
    # CNN image encoder on raw images (upstream EncoderImageFull, `--cnn_type resnet152`): "" = features.
    backbone: str = ""
    backbone_weights: str = ""  # ImageNet state dict in torchvision's layout, loaded when building
    backbone_frozen_bn: bool = True
    finetune: bool = False  # upstream --finetune: train the CNN too (else only fc and the text encoder)


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


class CnnImageEncoder(nn.Module):
    """Raw images -> CNN -> global average pool -> fc (the classifier replaced by Linear(C, embed_dim), Xavier)
    -> l2norm (upstream `EncoderImageFull`)."""

    def __init__(self, backbone: str, embed_dim: int, *, no_imgnorm: bool = False, finetune: bool = False,
                 frozen_bn: bool = True, weights: str = "", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.cnn = create_backbone(backbone, frozen_bn=frozen_bn, device=device, dtype=dtype)
        if weights:
            load_backbone_weights(self.cnn, weights)
        self.cnn.requires_grad_(finetune)
        self.head = FcImageEncoder(self.cnn.out_channels, embed_dim, no_imgnorm=no_imgnorm, device=device,
                                   dtype=dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.cnn.feature_map(images).mean(dim=(2, 3)))


class Vsepp(RetrievalModel):
    def __init__(self, cfg: VseppConfig, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.img_enc: nn.Module
        if cfg.backbone:
            self.img_enc = CnnImageEncoder(cfg.backbone, cfg.embed_dim, no_imgnorm=cfg.no_imgnorm,
                                           finetune=cfg.finetune, frozen_bn=cfg.backbone_frozen_bn,
                                           weights=cfg.backbone_weights, device=device, dtype=dtype)
        else:
            self.img_enc = FcImageEncoder(cfg.image_dim, cfg.embed_dim, no_imgnorm=cfg.no_imgnorm,
                                          device=device, dtype=dtype)
        self.txt_enc = GruTextEncoder(cfg.vocab_size, cfg.word_dim, cfg.embed_dim, num_layers=cfg.num_layers,
                                      output="last", device=device, dtype=dtype)

    def encode_image(self, images: torch.Tensor) -> Encoded:
        if self.cfg.backbone:
            if images.ndim != 4:
                raise DataError(f"vsepp with backbone {self.cfg.backbone!r} needs images (N, 3, H, W), got "
                                f"{tuple(images.shape)}; train it with --set data.source=images")
            return Encoded(self.img_enc(images))
        if images.ndim == 3:  # (B, R, D) region features -> (B, D)
            images = images.mean(dim=1)
        return Encoded(self.img_enc(images))

    def encode_text(self, captions: torch.Tensor, lengths: torch.Tensor) -> Encoded:
        return Encoded(l2norm(self.txt_enc(captions, lengths), dim=-1))


def build(cfg: VseppConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Vsepp:
    if cfg.backbone:
        if cfg.vocab_size <= 0:
            raise ConfigError("vsepp: model.vocab_size must be > 0 (it is set from the vocabulary when training)")
    else:
        check_data_sizes(cfg)
    return Vsepp(cfg, device=device, dtype=dtype)


SPEC = register_method(MethodSpec(
    name="vsepp", config=VseppConfig, build=build,
    pixels=lambda cfg: backbone_normalisation(cfg.backbone) if cfg.backbone else None,
    for_loading=lambda cfg: dataclasses.replace(cfg, backbone_weights=""),  # the checkpoint's weights replace them
    ddp_refusal=lambda cfg: backbone_ddp_refusal(cfg.name, cfg.backbone),
))
