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
from typing import Any, Literal

import torch
from torch import nn

from itmatch.checkpoints.official import is_two_encoder_release, split_state
from itmatch.config import non_negative, positive
from itmatch.errors import CheckpointError, ConfigError, DataError
from itmatch.method import Importer, MethodSpec
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
    image_dim: int = non_negative(0)  # 0 = taken from the data at training time
    embed_dim: int = positive(1024)
    word_dim: int = positive(300)
    num_layers: int = positive(1)
    vocab_size: int = non_negative(0)  # taken from the vocabulary at training time
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


# ------------------------------------------------------------------------ released checkpoints of the original
# Import fartashf/vsepp checkpoints (`model_best.pth.tar` of its `train.py`, precomputed-feature models).
#
# The original saves `{'epoch', 'model': [img_enc.state_dict(), txt_enc.state_dict()], 'best_rsum', 'opt'
# (argparse.Namespace), 'Eiters'}` (spec vsepp_and_scan.md section 2.6). A precomp image encoder holds `fc.weight`
# (embed, img_dim) and `fc.bias`; the text encoder `embed.weight` and a unidirectional GRU `rnn.*`. Its vocabulary
# is a separate pickle (`vocab/{data_name}_vocab.pkl`), read by `data.vocab.load_vocab`.
#
# The same file layout is written by SCAN (whose options add `cross_attn` / `lambda_softmax`), VSRN, VSE-infinity
# and HREM (extra image keys), so `detect` accepts only an fc image state, a unidirectional GRU and no SCAN options.

_FC = {"fc.weight", "fc.bias"}


def detect(ckpt: Any) -> bool:
    """A VSE++ release: an fc (precomp) or CNN + fc (raw images) image state, a one-way GRU, no SCAN options."""
    if not is_two_encoder_release(ckpt):
        return False
    opt = ckpt["opt"]
    if hasattr(opt, "cross_attn") or hasattr(opt, "lambda_softmax"):
        return False
    img_sd, txt_sd = ckpt["model"]
    image_ok = _FC <= set(img_sd) and all(k in _FC or k.startswith("cnn.") for k in img_sd)
    text_ok = ("embed.weight" in txt_sd and "rnn.weight_ih_l0" in txt_sd
               and all(k == "embed.weight" or (k.startswith("rnn.") and not k.endswith("_reverse")) for k in txt_sd))
    return image_ok and text_ok


def convert(official: dict[str, Any], where: str = "checkpoint") -> tuple[VseppConfig, dict[str, torch.Tensor]]:
    """(config, state dict of `Vsepp`) from an original VSE++ checkpoint; sizes come from the tensors."""
    opt = official["opt"]
    img_sd, txt_sd = split_state(official, where)
    if any(k.startswith("cnn.") for k in img_sd):
        raise CheckpointError(f"{where}: a VSE++ raw-image (CNN) checkpoint; only precomputed-feature ones import")
    if getattr(opt, "measure", "cosine") != "cosine" or getattr(opt, "use_abs", False):
        raise CheckpointError(f"{where}: a VSE++ order-embedding model (measure={getattr(opt, 'measure', '?')}, "
                              f"use_abs={getattr(opt, 'use_abs', '?')}); only the cosine models import")
    embed_dim, image_dim = img_sd["fc.weight"].shape
    vocab_size, word_dim = txt_sd["embed.weight"].shape
    hidden = txt_sd["rnn.weight_hh_l0"].shape[1]
    if hidden != embed_dim:
        raise CheckpointError(f"{where}: GRU size {hidden} differs from the image embedding size {embed_dim}")
    cfg = VseppConfig(
        image_dim=int(image_dim), embed_dim=int(embed_dim), word_dim=int(word_dim), vocab_size=int(vocab_size),
        num_layers=sum(1 for k in txt_sd if k.startswith("rnn.weight_ih_l")),
        no_imgnorm=bool(getattr(opt, "no_imgnorm", False)),
    )
    state = {f"img_enc.{k}": v for k, v in img_sd.items()}
    state |= {f"txt_enc.{k}": v for k, v in txt_sd.items()}
    return cfg, state


SPEC = register_method(MethodSpec(
    name="vsepp", config=VseppConfig, build=build,
    # last: SCAN, VSRN and HREM files share its layout, with more in them
    importers=(Importer(detect, convert, priority=90),),
    pixels=lambda cfg: backbone_normalisation(cfg.backbone) if cfg.backbone else None,
    for_loading=lambda cfg: dataclasses.replace(cfg, backbone_weights=""),  # the checkpoint's weights replace them
    ddp_refusal=lambda cfg: backbone_ddp_refusal(cfg.name, cfg.backbone),
))
