"""Import the released VSE-infinity checkpoints (github.com/woodfrog/vse_infty @ 29df9d6 / bigru @ 8600f89).

Upstream `train.py:save_checkpoint` writes `{'epoch', 'model': [img_enc_state, txt_enc_state], 'best_rsum',
'opt': argparse.Namespace, 'Eiters'}`. Keys carry a `module.` prefix when the encoders were wrapped in
DataParallel (always on the BERT branch, never on the BiGRU region models). Upstream loads them with
`strict=False`, so a renamed key silently keeps random weights; `convert` returns a state dict for a strict load
and drops only `bert.embeddings.position_ids`, a buffer older transformers saved and newer ones recompute.
Only region-feature models (`precomp_enc_type basic`) exist here; grid (backbone) checkpoints are refused.
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
    return any(_strip(k).startswith("gpool.") for k in model[0])


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
    if getattr(opt, "precomp_enc_type", "basic") != "basic":
        raise CheckpointError(
            f"VSE-infinity checkpoint with precomp_enc_type={opt.precomp_enc_type!r} (grid features from a CNN "
            "backbone): only region-feature models ('basic') are supported"
        )
    img_sd = {_strip(k): v for k, v in official["model"][0].items()}
    txt_sd = {_strip(k): v for k, v in official["model"][1].items() if _strip(k) not in _DROPPED}
    if "fc.weight" not in img_sd:
        raise CheckpointError("VSE-infinity checkpoint: the image state has no fc.weight")
    embed_dim, image_dim = img_sd["fc.weight"].shape
    is_bert = any(k.startswith("bert.") for k in txt_sd)
    vocab_size, word_dim = txt_sd["embed.weight"].shape if "embed.weight" in txt_sd else (0, 300)
    cfg = VseInfinityConfig(
        image_dim=int(image_dim), embed_dim=int(embed_dim), text_encoder="bert" if is_bert else "bigru",
        vocab_size=int(vocab_size), word_dim=int(word_dim),
        no_imgnorm=bool(getattr(opt, "no_imgnorm", False)), no_txtnorm=bool(getattr(opt, "no_txtnorm", False)),
        vse_mean_warmup_epochs=int(getattr(opt, "vse_mean_warmup_epochs", 0)),
    )
    state = {f"img_enc.{k}": v for k, v in img_sd.items()}
    state |= {f"txt_enc.{k if is_bert else _text_key(k)}": v for k, v in txt_sd.items()}
    return cfg, state
