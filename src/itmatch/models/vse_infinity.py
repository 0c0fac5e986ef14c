"""VSE-infinity — Chen, Deng, Liu, Wang and Chuang, "Learning the Best Pooling Strategy for Visual Semantic
Embedding", CVPR 2021.

Port of github.com/woodfrog/vse_infty @ 29df9d6 (branch master: BERT text) and @ 8600f89 (branch bigru).
Region path (`precomp_enc_type basic`): `fc(v) + MLP(v)` per region (MLP = Linear -> BatchNorm -> ReLU -> Linear,
its second BatchNorm `bns.1` is created but never applied, kept for strict loading), GPO over the regions, l2norm
(+1e-8). Grid path (`backbone`, raw images; upstream `EncoderImageFull`): CNN grid (B, h*w, C) -> fc -> GPO ->
l2norm, grid-size augmentation in training, stage-wise backbone unfreezing. Text: BERT last hidden states ->
Linear -> GPO, or a BiGRU (directions averaged) -> GPO, l2norm. Similarity = dot product. Training: hinge loss,
VSE0 during `vse_mean_warmup_epochs` then hardest negatives; AdamW as upstream per branch; region dropping and
word noise come from the data pipeline (`itmatch.data.augment`, `train.region_drop` / `train.word_noise`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from itmatch.config import non_negative, positive
from itmatch.errors import CheckpointError, ConfigError, DataError
from itmatch.method import Importer, MethodSpec, vocabulary_tokenizer
from itmatch.models.base import Encoded, RetrievalModel, check_data_sizes
from itmatch.modules.backbones import (
    backbone_ddp_refusal,
    backbone_normalisation,
    create_backbone,
    load_backbone_weights,
)
from itmatch.modules.gpo import Gpo
from itmatch.modules.norm import EPS, l2norm
from itmatch.modules.region_mlp import RegionMlp
from itmatch.modules.text_bert import STALE_BERT_KEYS, bert_tokens, load_bert, relocate_bert
from itmatch.modules.text_gru import GruTextEncoder
from itmatch.recipe import Recipe, fused
from itmatch.registry import register_method


@dataclass(frozen=True, slots=True)
class VseInfinityConfig:
    name: Literal["vse_infinity"] = "vse_infinity"
    image_dim: int = non_negative(0)  # 0 = taken from the data at training time
    embed_dim: int = positive(1024)
    text_encoder: Literal["bigru", "bert"] = "bigru"
    vocab_size: int = non_negative(0)  # bigru: taken from the vocabulary (+ <mask>) at training time
    word_dim: int = positive(300)  # bigru word embedding size
    bert_path: str = ""  # bert: local BERT directory (config, weights, vocab.txt) or pkg:PACKAGE/SUBDIR
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    vse_mean_warmup_epochs: int = non_negative(0)  # VSE0 epochs before hardest negatives (upstream scripts: 1)
    # Grid variant (upstream precomp_enc_type 'backbone'): "" = region features; else a backbone of
    # itmatch.modules.backbones (butd_resnet101 = upstream 'detector', resnext101_32x8d = 'wsl', resnet152, ...).
    backbone: str = ""
    backbone_weights: str = ""  # ImageNet/WSL state dict or original_updown_backbone.pth, loaded when building
    backbone_frozen_bn: bool = True  # upstream keeps the backbone's BatchNorms in eval mode
    backbone_lr_factor: float = positive(0.01)  # backbone lr = lr * this
    embedding_warmup_epochs: int = non_negative(2)  # whole backbone frozen (upstream default 2, scripts 1)
    backbone_warmup_epochs: int = non_negative(5)  # then layer4, +layer3, +layer2, all, each this many epochs


class RegionEncoder(nn.Module):
    """Region features (B, K, image_dim) + lengths -> (B, embed_dim) (upstream `EncoderImageAggr`, basic)."""

    def __init__(self, image_dim: int, embed_dim: int, *, no_imgnorm: bool = False, mlp: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc = nn.Linear(image_dim, embed_dim, **dd)
        # Grid features (upstream precomp_enc_type 'backbone') take fc alone, no MLP branch.
        self.mlp = RegionMlp(image_dim, embed_dim // 2, embed_dim, **dd) if mlp else None
        self.gpool = Gpo(32, 32, **dd)
        self.no_imgnorm = no_imgnorm
        r = math.sqrt(6.0) / math.sqrt(image_dim + embed_dim)  # Xavier-uniform fc, zero bias, as upstream
        nn.init.uniform_(self.fc.weight, -r, r)
        nn.init.zeros_(self.fc.bias)

    def forward(self, images: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.fc(images) if self.mlp is None else self.fc(images) + self.mlp(images)
        pooled, _ = self.gpool(x, lengths)
        return pooled if self.no_imgnorm else l2norm(pooled, eps=EPS)


def grid_size_augment(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream `EncoderImageFull` training augmentation: per image draw r ~ U[0,1); if r > 0.2, keep each grid
    cell iff U[0,1) > 0.2 r (else keep all), kept cells moved to the front in order, zero-padded, the batch cut to
    the longest. Returns (grid (B, L, C), lengths (B,)). Draws from torch's global generator, as dropout."""
    b, n, _ = grid.shape
    r = torch.rand(b, device=grid.device)
    keep = torch.rand(b, n, device=grid.device) > 0.2 * r[:, None]
    keep |= (r <= 0.2)[:, None] | ~keep.any(dim=1, keepdim=True)  # an image losing every cell keeps them all
    lengths = keep.sum(dim=1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept cells first, original order
    packed = grid.gather(1, order[..., None].expand_as(grid))
    valid = torch.arange(n, device=grid.device)[None, :] < lengths[:, None]
    packed = packed * valid[..., None].to(packed.dtype)
    return packed[:, : int(lengths.max())], lengths


class GridEncoder(nn.Module):
    """Raw images -> CNN grid (B, h*w, C) -> fc -> GPO -> l2norm (upstream `EncoderImageFull` + 'backbone'
    `EncoderImageAggr`); grid-size augmentation in training."""

    def __init__(self, backbone: str, embed_dim: int, *, no_imgnorm: bool = False, frozen_bn: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.backbone = create_backbone(backbone, frozen_bn=frozen_bn, device=device, dtype=dtype)
        self.image_encoder = RegionEncoder(self.backbone.out_channels, embed_dim, no_imgnorm=no_imgnorm, mlp=False,
                                           device=device, dtype=dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.backbone.grid(images)  # (B, h*w, C)
        if self.training:
            grid, lengths = grid_size_augment(grid)
        else:
            lengths = torch.full((len(grid),), grid.shape[1], dtype=torch.long, device=grid.device)
        return self.image_encoder(grid, lengths)


class BiGruGpoText(nn.Module):
    """BiGRU text encoder (bigru branch `EncoderText`): embed -> packed BiGRU, directions averaged -> GPO."""

    def __init__(self, vocab_size: int, word_dim: int, embed_dim: int, *, no_txtnorm: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.gru = GruTextEncoder(vocab_size, word_dim, embed_dim, bidirectional=True, output="all", device=device,
                                  dtype=dtype)
        self.gpool = Gpo(32, 32, device=device, dtype=dtype)
        self.no_txtnorm = no_txtnorm

    def forward(self, captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.gpool(self.gru(captions, lengths), lengths)  # lengths include <start>/<end>
        return pooled if self.no_txtnorm else l2norm(pooled, eps=EPS)


class BertGpoText(nn.Module):
    """BERT text encoder (master `EncoderText`): BERT -> Linear(hidden_size, embed_dim) -> GPO."""

    def __init__(self, bert_path: str, embed_dim: int, *, no_txtnorm: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.bert = load_bert(bert_path, device=device, dtype=dtype)
        # Upstream hard-codes 768 (bert-base); the size comes from the BERT config here.
        self.linear = nn.Linear(self.bert.config.hidden_size, embed_dim, device=device, dtype=dtype)
        self.gpool = Gpo(32, 32, device=device, dtype=dtype)
        self.no_txtnorm = no_txtnorm

    def forward(self, captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.linear(bert_tokens(self.bert, captions))
        pooled, _ = self.gpool(x, lengths)  # lengths include [CLS]/[SEP]
        return pooled if self.no_txtnorm else l2norm(pooled, eps=EPS)


class VseInfinity(RetrievalModel):
    def __init__(self, cfg: VseInfinityConfig, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        dd = {"device": device, "dtype": dtype}
        self.img_enc: nn.Module
        if cfg.backbone:
            self.img_enc = GridEncoder(cfg.backbone, cfg.embed_dim, no_imgnorm=cfg.no_imgnorm,
                                       frozen_bn=cfg.backbone_frozen_bn, **dd)
            if cfg.backbone_weights:
                load_backbone_weights(self.img_enc.backbone, cfg.backbone_weights)
        else:
            self.img_enc = RegionEncoder(cfg.image_dim, cfg.embed_dim, no_imgnorm=cfg.no_imgnorm, **dd)
        self.txt_enc: nn.Module
        match cfg.text_encoder:
            case "bigru":
                self.txt_enc = BiGruGpoText(cfg.vocab_size, cfg.word_dim, cfg.embed_dim, no_txtnorm=cfg.no_txtnorm,
                                            **dd)
            case "bert":
                self.txt_enc = BertGpoText(cfg.bert_path, cfg.embed_dim, no_txtnorm=cfg.no_txtnorm, **dd)

    def encode_image(self, images: torch.Tensor, lengths: torch.Tensor | None = None) -> Encoded:
        """images (B, K, image_dim) with lengths (B,) valid regions (default: all K, as at evaluation), or raw
        images (B, 3, S, S) for the grid variant."""
        if self.cfg.backbone:
            if images.ndim != 4:
                raise DataError(f"vse_infinity with backbone {self.cfg.backbone!r} needs images (N, 3, H, W), got "
                                f"{tuple(images.shape)}; train it with --set data.source=images")
            return Encoded(self.img_enc(images))
        if images.ndim != 3:
            raise DataError(f"vse_infinity needs region features (N, regions, dim), got {tuple(images.shape)}")
        if lengths is None:
            lengths = torch.full((len(images),), images.shape[1], dtype=torch.long, device=images.device)
        return Encoded(self.img_enc(images, lengths))

    def encode_text(self, captions: torch.Tensor, lengths: torch.Tensor) -> Encoded:
        return Encoded(self.txt_enc(captions, lengths))


class VseInfinityRecipe(Recipe):
    """Upstream's training: VSE0 for `vse_mean_warmup_epochs`, then hardest negatives (and they stay on); AdamW as
    upstream per branch; grid models unfreeze the backbone stage-wise and warm the loss up linearly in the epoch the
    backbone starts training."""

    def __init__(self, model: VseInfinity, config: Any, collective: Any = None) -> None:
        super().__init__(model, config, collective)
        self.epoch, self.loss_scale = -1, 1.0

    def on_epoch_start(self, epoch: int) -> None:
        cfg = self.model.cfg
        if epoch >= cfg.vse_mean_warmup_epochs:
            self.max_violation = True
        if cfg.backbone:
            self.model.img_enc.backbone.set_fixed_blocks(backbone_fixed_blocks(
                epoch, cfg.embedding_warmup_epochs, cfg.backbone_warmup_epochs))
        self.epoch = epoch

    def on_step_start(self, step: int, steps: int) -> None:
        # Upstream train.py, grid models: in the epoch the backbone starts training, the loss is scaled by
        # i / (len(dataset) // batch_size + 1) at iteration i (its "linear warm-up"; with AdamW it acts through
        # gradient clipping). `steps` is our epoch length, ceil(len / batch), upstream's divisor when len % batch.
        cfg = self.model.cfg
        warm = bool(cfg.backbone) and self.epoch == cfg.embedding_warmup_epochs
        self.loss_scale = step / steps if warm else 1.0

    def loss(self, images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, *, epoch: int,
             image_lengths: torch.Tensor | None = None, **inputs: Any) -> dict[str, torch.Tensor]:
        terms = super().loss(images, captions, lengths, epoch=epoch, image_lengths=image_lengths, **inputs)
        return terms if self.loss_scale == 1.0 else {**terms, "loss": terms["loss"] * self.loss_scale}

    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        """AdamW as upstream: bert branch groups (text w/o BERT lr, BERT 0.1 lr, image lr) with weight decay 1e-4;
        bigru branch one group with torch's default weight decay 0.01 (it passes none)."""
        model, cfg = self.model, self.model.cfg
        if cfg.text_encoder == "bigru" and not cfg.backbone:
            return fused(torch.optim.AdamW, model.parameters(), lr=lr, weight_decay=0.01)
        if cfg.text_encoder == "bigru":
            text = [{"params": list(model.txt_enc.parameters()), "lr": lr}]
        else:
            bert = {id(p) for p in model.txt_enc.bert.parameters()}
            trainable = [p for p in model.txt_enc.parameters() if p.requires_grad]
            text = [{"params": [p for p in trainable if id(p) not in bert], "lr": lr},
                    {"params": [p for p in trainable if id(p) in bert], "lr": 0.1 * lr}]
        if not cfg.backbone:
            return fused(torch.optim.AdamW, [*text, {"params": list(model.img_enc.parameters()), "lr": lr}],
                         lr=lr, weight_decay=1e-4)
        # Grid: backbone top (layer4) and base at lr * backbone_lr_factor, fc + GPO at lr, weight decay 1e-4.
        backbone, factor = model.img_enc.backbone, cfg.backbone_lr_factor
        return fused(torch.optim.AdamW, [
            *text,
            {"params": backbone.top_parameters(), "lr": lr * factor},
            {"params": backbone.base_parameters(), "lr": lr * factor},
            {"params": list(model.img_enc.image_encoder.parameters()), "lr": lr},
        ], lr=lr, weight_decay=1e-4)


def backbone_fixed_blocks(epoch: int, embedding_warmup: int, backbone_warmup: int) -> int:
    """Upstream's stage-wise unfreezing: the whole backbone frozen (4) for `embedding_warmup` epochs, then
    3, 2, 1 fixed stages for `backbone_warmup` epochs each, then 0 (everything trains)."""
    if epoch < embedding_warmup:
        return 4
    if backbone_warmup <= 0:
        return 0
    return max(0, 3 - (epoch - embedding_warmup) // backbone_warmup)


def build(cfg: VseInfinityConfig, *, device: torch.device | str | None = None,
          dtype: torch.dtype | None = None) -> VseInfinity:
    if not cfg.backbone:
        check_data_sizes(cfg, vocab=False)
    if cfg.text_encoder == "bigru" and cfg.vocab_size <= 0:
        raise ConfigError("vse_infinity: text_encoder 'bigru' needs model.vocab_size > 0 (set from the vocabulary)")
    return VseInfinity(cfg, device=device, dtype=dtype)

# ------------------------------------------------------------------------ released checkpoints of the original
# Import the released VSE-infinity checkpoints (github.com/woodfrog/vse_infty @ 29df9d6 / bigru @ 8600f89).
#
# Upstream `train.py:save_checkpoint` writes `{'epoch', 'model': [img_enc_state, txt_enc_state], 'best_rsum',
# 'opt': argparse.Namespace, 'Eiters'}`. Keys carry a `module.` prefix when the encoders were wrapped in
# DataParallel (always on the BERT branch, never on the BiGRU region models). Upstream loads them with
# `strict=False`, so a renamed key silently keeps random weights; `convert` returns a state dict for a strict load
# and drops only `bert.embeddings.position_ids`, a buffer older transformers saved and newer ones recompute.
# Grid models (`precomp_enc_type backbone`) hold the CNN twice, as `backbone.resnet.*` and as the same tensors under
# `backbone.base.{0,1,4,5,6}.*` / `backbone.top.0.*`; the duplicates are checked to be equal and dropped, as is the
# unused classifier `backbone.resnet.fc.*`. `opt.backbone_source` names the CNN (`detector` = BUTD ResNet-101).


_BIGRU_RENAMES = {"embed.": "gru.embed.", "rnn.": "gru.rnn."}  # upstream EncoderText -> BiGruGpoText


def detect(ckpt: Any) -> bool:
    """Whether `ckpt` looks like a VSE-infinity release: a 2-list of state dicts with GPO (`gpool.`) keys + opt."""
    if not isinstance(ckpt, Mapping) or "opt" not in ckpt:
        return False
    model = ckpt.get("model")
    if not isinstance(model, list | tuple) or len(model) != 2 or not all(isinstance(m, Mapping) for m in model):
        return False
    return any(_strip(k).startswith(("gpool.", "image_encoder.gpool.")) for k in model[0])  # region / grid


def _strip(key: str) -> str:
    return key.removeprefix("module.")  # DataParallel prefix


def _text_key(key: str) -> str:
    for old, new in _BIGRU_RENAMES.items():
        if key.startswith(old):
            return new + key.removeprefix(old)
    return key


def convert(official: Mapping[str, Any]) -> tuple[VseInfinityConfig, dict[str, torch.Tensor]]:
    """(config, state dict for `VseInfinity`) from a loaded upstream checkpoint; sizes come from the tensors.

    `bert_path` stays empty: a BERT model needs the caller to name a BERT directory (config + tokenizer).
    """
    if not detect(official):
        raise CheckpointError("not a VSE-infinity checkpoint: expected {'model': [image_state, text_state], 'opt'}")
    opt = official["opt"]
    enc_type = getattr(opt, "precomp_enc_type", "basic")
    if enc_type not in ("basic", "backbone"):
        raise CheckpointError(f"VSE-infinity checkpoint with unknown precomp_enc_type={enc_type!r}")
    img_sd = {_strip(k): v for k, v in official["model"][0].items()}
    backbone = ""
    if enc_type == "backbone":
        backbone, img_sd = _grid_image_state(img_sd, str(getattr(opt, "backbone_source", "detector")))
    txt_sd = {_strip(k): v for k, v in official["model"][1].items() if _strip(k) not in STALE_BERT_KEYS}
    if "fc.weight" not in img_sd and "image_encoder.fc.weight" not in img_sd:
        raise CheckpointError("VSE-infinity checkpoint: the image state has no fc.weight")
    embed_dim, image_dim = img_sd["image_encoder.fc.weight" if backbone else "fc.weight"].shape
    is_bert = any(k.startswith("bert.") for k in txt_sd)
    vocab_size, word_dim = txt_sd["embed.weight"].shape if "embed.weight" in txt_sd else (0, 300)
    cfg = VseInfinityConfig(
        image_dim=int(image_dim), embed_dim=int(embed_dim), text_encoder="bert" if is_bert else "bigru",
        backbone=backbone,
        vocab_size=int(vocab_size), word_dim=int(word_dim),
        no_imgnorm=bool(getattr(opt, "no_imgnorm", False)), no_txtnorm=bool(getattr(opt, "no_txtnorm", False)),
        vse_mean_warmup_epochs=int(getattr(opt, "vse_mean_warmup_epochs", 0)),
    )
    state = {f"img_enc.{k}": v for k, v in img_sd.items()}
    state |= {f"txt_enc.{k if is_bert else _text_key(k)}": v for k, v in txt_sd.items()}
    return cfg, state


# upstream `--backbone_source` -> itmatch backbone
BACKBONES = {"detector": "butd_resnet101", "wsl": "resnext101_32x8d", "imagenet": "resnet101",
             "imagenet_res50": "resnet50", "imagenet_res152": "resnet152", "imagenet_resnext": "resnext101_32x8d"}
_BASE = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3"}


def _grid_image_state(img_sd: dict[str, torch.Tensor], source: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(backbone name, image state of `GridEncoder`) from upstream's `EncoderImageFull` state."""
    if source not in BACKBONES:
        raise CheckpointError(f"VSE-infinity grid checkpoint: unknown backbone_source {source!r}; "
                              f"known: {', '.join(BACKBONES)}")
    resnet = {k.removeprefix("backbone.resnet."): v for k, v in img_sd.items() if k.startswith("backbone.resnet.")}
    if not resnet:
        raise CheckpointError("VSE-infinity grid checkpoint: the image state has no backbone.resnet.* weights")
    for key, value in img_sd.items():  # base/top are the same modules registered twice: check, then drop
        head, _, rest = key.partition(".")
        if head != "backbone" or rest.startswith("resnet."):
            continue
        part, _, sub = rest.partition(".")
        index, _, name = sub.partition(".")
        own = _BASE.get(index) if part == "base" else "layer4" if part == "top" and index == "0" else None
        if own is None or f"{own}.{name}" not in resnet:
            raise CheckpointError(f"VSE-infinity grid checkpoint: unexpected image key {key}")
        if not torch.equal(resnet[f"{own}.{name}"], value):
            raise CheckpointError(f"VSE-infinity grid checkpoint: {key} differs from backbone.resnet.{own}.{name}")
    out = {f"backbone.{k}": v for k, v in resnet.items() if not k.startswith("fc.")}  # classifier unused
    out |= {k: v for k, v in img_sd.items() if k.startswith("image_encoder.")}
    return BACKBONES[source], out


def _tokenizer(cfg: VseInfinityConfig, vocab: Any) -> Any:
    if cfg.text_encoder == "bert":
        from itmatch.data.wordpiece import WordpieceTokenizer

        return WordpieceTokenizer(cfg.bert_path)
    # The bigru branch appends <mask> to the loaded vocabulary (vocab_size = words in the JSON + 1).
    return vocabulary_tokenizer(cfg, vocab, ("<mask>",))


def _release_data(official: Mapping[str, Any], cfg: VseInfinityConfig) -> dict[str, Any]:
    """A grid release reads raw images at the size it was trained on (`opt.input_scale_factor`)."""
    if not cfg.backbone:
        return {}
    return {"source": "images", "input_scale_factor": float(getattr(official["opt"], "input_scale_factor", 1.0))}


SPEC = register_method(MethodSpec(
    name="vse_infinity", config=VseInfinityConfig, build=build, recipe=VseInfinityRecipe,
    importers=(Importer(detect, convert, priority=10, data=_release_data),),
    tokenizer=_tokenizer, uses_vocab=lambda cfg: cfg.text_encoder != "bert",
    pixels=lambda cfg: backbone_normalisation(cfg.backbone) if cfg.backbone else None,
    relocate=relocate_bert, for_loading=lambda cfg: dataclasses.replace(cfg, backbone_weights=""),
    neutral_keys=frozenset({"bert_path"}), region_drop=True,
    ddp_refusal=lambda cfg: backbone_ddp_refusal(cfg.name, cfg.backbone),
))
