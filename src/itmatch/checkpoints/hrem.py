"""Import released HREM checkpoints (github.com/CrossmodalGroup/HREM @ 1ad2612).

Upstream `train.py` writes `{'model': [img_enc_state, txt_enc_state], 'opt': argparse.Namespace, 'epoch',
'best_rsum', 'Eiters'}` (a `module.` prefix only with `--multi_gpu 1`). The image state holds `fc.fc.*`,
`fc.mlp.*` (FC_MLP) and `aggr.layers.0.*` (the pooling transformer), the text state `bert.*`, `linear.*` and
`aggr.layers.0.*`; the relation graph lives in the training criterion and is never saved. Upstream loads the text
state with `strict=False`; `convert` returns a state dict for a strict load and drops only
`bert.embeddings.position_ids`, a buffer older transformers saved and newer ones recompute.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from itmatch.checkpoints.official import is_two_encoder_release, split_state
from itmatch.errors import CheckpointError
from itmatch.models.hrem import HremConfig

_DROPPED = ("bert.embeddings.position_ids",)
_MARK = ("fc.fc.weight", "aggr.layers.0.self_attn.in_proj_weight")  # FC_MLP + pooling transformer: HREM's image side


def _strip(key: str) -> str:
    return key.removeprefix("module.")  # DataParallel prefix


def detect(ckpt: Any) -> bool:
    """Whether `ckpt` looks like an HREM release: two state dicts + opt, an FC_MLP and a transformer on images."""
    if not is_two_encoder_release(ckpt):
        return False
    keys = {_strip(k) for k in ckpt["model"][0]}
    return all(k in keys for k in _MARK)


def convert(official: Mapping[str, Any]) -> tuple[HremConfig, dict[str, torch.Tensor]]:
    """(config, state dict for `Hrem`) from a loaded upstream checkpoint; sizes come from the tensors.

    `nhead` and `residual_weight` come from `opt` (the tensors do not show them); `bert_path` stays empty: the
    caller names a BERT directory for the BERT config and tokenizer, the weights come from the checkpoint.
    """
    if not detect(official):
        raise CheckpointError("not an HREM checkpoint: expected {'model': [image_state, text_state], 'opt'} with "
                              "fc.fc.* and aggr.layers.0.* image keys")
    opt = official["opt"]
    image, text = split_state(dict(official), "HREM checkpoint")
    img_sd = {_strip(k): v for k, v in image.items()}
    txt_sd = {_strip(k): v for k, v in text.items() if _strip(k) not in _DROPPED}
    if not any(k.startswith("bert.") for k in txt_sd):
        raise CheckpointError("HREM checkpoint: the text state has no bert.* weights")
    embed_dim, image_dim = img_sd["fc.fc.weight"].shape
    missing = [f for f in ("nhead", "residual_weight") if not hasattr(opt, f)]
    if missing:
        raise CheckpointError(f"HREM checkpoint: opt lacks {', '.join(missing)} (needed to rebuild the encoders)")
    cfg = HremConfig(
        image_dim=int(image_dim), embed_dim=int(embed_dim), nhead=int(opt.nhead),
        residual_weight=float(opt.residual_weight), dropout=float(getattr(opt, "dropout", 0.1)),
        no_imgnorm=bool(getattr(opt, "no_imgnorm", False)), no_txtnorm=bool(getattr(opt, "no_txtnorm", False)),
        warmup_iterations=int(getattr(opt, "warmup", 8000)), graph_layers=int(getattr(opt, "num_layers_enc", 1)),
        graph_lr_factor=float(getattr(opt, "graph_lr_factor", 1.0)),
        mask_weight=float(getattr(opt, "mask_weight", 1.0)), threshold=float(getattr(opt, "threshold", 0.5)),
        relation_topk=int(getattr(opt, "topk", 10)), reg_loss_weight=float(getattr(opt, "reg_loss_weight", 10.0)),
        norm_input=bool(getattr(opt, "norm_input", 1)), cross_loss=bool(getattr(opt, "cross_loss", 1)),
        triplet_cutoff=1.9 if getattr(opt, "dataset", "f30k") == "coco" else 1.7,
    )
    state = {f"img_enc.{k}": v for k, v in img_sd.items()}
    state |= {f"txt_enc.{k}": v for k, v in txt_sd.items()}
    return cfg, state
