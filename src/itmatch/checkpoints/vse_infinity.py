"""Import the released VSE-infinity checkpoints (github.com/woodfrog/vse_infty @ 29df9d6 / bigru @ 8600f89).

Upstream `train.py:save_checkpoint` writes `{'epoch', 'model': [img_enc_state, txt_enc_state], 'best_rsum',
'opt': argparse.Namespace, 'Eiters'}`. Keys carry a `module.` prefix when the encoders were wrapped in
DataParallel (always on the BERT branch, never on the BiGRU region models). Upstream loads them with
`strict=False`, so a renamed key silently keeps random weights; `convert` returns a state dict for a strict load
and drops only `bert.embeddings.position_ids`, a buffer older transformers saved and newer ones recompute.
Grid models (`precomp_enc_type backbone`) hold the CNN twice, as `backbone.resnet.*` and as the same tensors under
`backbone.base.{0,1,4,5,6}.*` / `backbone.top.0.*`; the duplicates are checked to be equal and dropped, as is the
unused classifier `backbone.resnet.fc.*`. `opt.backbone_source` names the CNN (`detector` = BUTD ResNet-101).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from itmatch.errors import CheckpointError
from itmatch.models.vse_infinity import VseInfinityConfig

_DROPPED = ("bert.embeddings.position_ids",)
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
    txt_sd = {_strip(k): v for k, v in official["model"][1].items() if _strip(k) not in _DROPPED}
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
