"""Import kuanghuei/SCAN checkpoints (`model_best.pth.tar`): pure remapping to `ScanConfig` + our state dict."""

from __future__ import annotations

from typing import Any

import torch

from itmatch.checkpoints.official import is_two_encoder_release, split_state
from itmatch.errors import CheckpointError
from itmatch.models.scan import ScanConfig


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
        precomp_enc_type="weight_norm" if weight_norm else "basic", cross_attn=opt.cross_attn,
        raw_feature_norm=opt.raw_feature_norm, agg_func=opt.agg_func, lambda_lse=float(opt.lambda_lse),
        lambda_softmax=float(opt.lambda_softmax),
    )
    renames = {"fc.weight_g": "fc.parametrizations.weight.original0",
               "fc.weight_v": "fc.parametrizations.weight.original1"}
    state = {f"img_enc.{renames.get(k, k)}": v for k, v in img_sd.items()}
    if weight_norm:  # torch 0.3 stored g with shape (1,) or (); the parametrization wants ()
        key = "img_enc.fc.parametrizations.weight.original0"
        state[key] = state[key].reshape(())
    state |= {f"txt_enc.{k}": v for k, v in txt_sd.items()}
    return cfg, state
