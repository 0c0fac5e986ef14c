"""Import the released VSRN checkpoints (github.com/KunpengLi1994/VSRN @ 777ae74, train.py:save_checkpoint).

An official file is `{'epoch', 'model': [img_enc.state_dict(), txt_enc.state_dict()], 'best_rsum', 'opt'
(argparse.Namespace), 'Eiters'}`. Image keys: `fc.*`, `img_rnn.*`, `Rs_GCN_{1..4}.{g,theta,phi,W.0}.*` (1x1
convolutions, weights (out, in, 1)), `Rs_GCN_k.W.1.*` (batch norm) and, for `opt.data_name == 'f30k_precomp'`
only, `bn.*`. Text keys: `embed.weight`, `rnn.*`. The caption branch was never saved.

`convert` is pure: it renames keys, squeezes the conv kernel axis, and reads the configuration from the tensors'
shapes, except the two data-name switches, which only `opt.data_name` records (upstream tests that exact string).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from itmatch.errors import CheckpointError
from itmatch.models.vsrn import VsrnConfig

F30K = "f30k_precomp"
_GCN = re.compile(r"Rs_GCN_(\d+)\.(g|theta|phi|W\.0|W\.1)\.(\w+)$")
_GCN_PART = {"g": "g", "theta": "theta", "phi": "phi", "W.0": "w", "W.1": "bn"}


def detect(official: Any) -> bool:
    """True for a dict whose `model` is [image, text] state dicts with VSRN's graph-convolution keys."""
    model = official.get("model") if isinstance(official, Mapping) else None
    return (isinstance(model, list | tuple) and len(model) == 2 and isinstance(model[0], Mapping)
            and "Rs_GCN_1.g.weight" in model[0])


def convert(official: Mapping[str, Any]) -> tuple[VsrnConfig, dict[str, torch.Tensor]]:
    """Official VSRN checkpoint dict -> (VsrnConfig, state dict of `Vsrn`) for strict loading."""
    if not detect(official) or "opt" not in official:
        raise CheckpointError("not a VSRN checkpoint: expected 'opt' and 'model' = [image state, text state]")
    opt, (img_sd, txt_sd) = official["opt"], official["model"]
    data_name = getattr(opt, "data_name", None)
    if not isinstance(data_name, str):
        raise CheckpointError("VSRN checkpoint: opt.data_name is missing; it decides the F30K/COCO image encoder")
    for key in ("fc.weight", "embed.weight"):
        if key not in (img_sd if key.startswith("fc") else txt_sd):
            raise CheckpointError(f"VSRN checkpoint: no {key!r} in its state dicts")
    state = {f"img_enc.{_image_key(k)}": _squeeze_conv(k, v) for k, v in img_sd.items()}
    state |= {f"txt_enc.{k}": v for k, v in txt_sd.items()}
    for k in [k for k in state if k.endswith(".running_mean")]:  # pre-0.4.1 files lack num_batches_tracked
        state.setdefault(k.replace(".running_mean", ".num_batches_tracked"), torch.tensor(0))
    embed_dim, image_dim = img_sd["fc.weight"].shape
    vocab_size, word_dim = txt_sd["embed.weight"].shape
    cfg = VsrnConfig(
        image_dim=int(image_dim),
        embed_dim=int(embed_dim),
        word_dim=int(word_dim),
        num_layers=sum(1 for k in txt_sd if k.startswith("rnn.weight_ih_l")),
        vocab_size=int(vocab_size),
        gcn_layers=len({m.group(1) for k in img_sd if (m := _GCN.match(k))}),
        fc_region_norm=data_name != F30K,
        final_bn=data_name == F30K,
        caption_hidden=int(getattr(opt, "dim_hidden", 512)),
        caption_word_dim=int(getattr(opt, "dim_word", 300)),
        caption_max_len=int(getattr(opt, "max_len", 60)),
        caption_dropout=float(getattr(opt, "input_dropout_p", 0.2)),
    )
    return cfg, state


def _image_key(key: str) -> str:
    if key.startswith("img_rnn."):
        return "rnn." + key.removeprefix("img_rnn.")
    m = _GCN.match(key)
    if m:
        return f"gcn.{int(m.group(1)) - 1}.{_GCN_PART[m.group(2)]}.{m.group(3)}"
    return key  # fc.*, bn.*; anything else is reported as unexpected by the strict load


def _squeeze_conv(key: str, value: torch.Tensor) -> torch.Tensor:
    if _GCN.match(key) and key.endswith(".weight") and value.ndim == 3 and value.shape[-1] == 1:
        return value.squeeze(-1)  # Conv1d (out, in, 1) -> Linear (out, in)
    return value
