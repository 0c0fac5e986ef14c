"""Import fartashf/vsepp checkpoints (`model_best.pth.tar` of its `train.py`, precomputed-feature models).

The original saves `{'epoch', 'model': [img_enc.state_dict(), txt_enc.state_dict()], 'best_rsum', 'opt'
(argparse.Namespace), 'Eiters'}` (spec vsepp_and_scan.md section 2.6). A precomp image encoder holds `fc.weight`
(embed, img_dim) and `fc.bias`; the text encoder `embed.weight` and a unidirectional GRU `rnn.*`. Its vocabulary
is a separate pickle (`vocab/{data_name}_vocab.pkl`), read by `data.vocab.load_vocab`.

The same file layout is written by SCAN (whose options add `cross_attn` / `lambda_softmax`), VSRN, VSE-infinity
and HREM (extra image keys), so `detect` accepts only an fc image state, a unidirectional GRU and no SCAN options.
"""

from __future__ import annotations

from typing import Any

import torch

from itmatch.checkpoints.official import is_two_encoder_release, split_state
from itmatch.errors import CheckpointError
from itmatch.models.vsepp import VseppConfig

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
