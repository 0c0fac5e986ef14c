"""Import CrossmodalGroup/GSMN checkpoints (`model_best.pth.tar`): pure remapping to `GsmnConfig` + our state dict.

The original saves `{'model': [img_enc, txt_enc, i2t_match_G, t2i_match_G state dicts], 'opt': Namespace, ...}`.
Sizes come from the tensors (the vocabulary size from the embedding), switches from `opt`; the weight-normed
heads keep their legacy `weight_g` / `weight_v` names, which `WeightNormLinear` uses too.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from itmatch.errors import CheckpointError
from itmatch.models.gsmn import GsmnConfig


def detect(ckpt: Any) -> bool:
    """A GSMN release: four state dicts (encoders + two graphs) and the run's options."""
    model = ckpt.get("model") if isinstance(ckpt, dict) else None
    return (isinstance(model, list | tuple) and len(model) == 4 and all(isinstance(m, dict) for m in model)
            and isinstance(ckpt.get("opt"), argparse.Namespace)
            and any(k.startswith("graph_convolution_1.") for k in model[2]))


def _graph(sd: dict[str, torch.Tensor], conv: str, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        if key.startswith(f"{conv}."):
            out[f"{prefix}.conv.{key.removeprefix(conv + '.')}"] = value
        elif key.startswith(("out_1.", "out_2.")):
            out[f"{prefix}.head.{key}"] = value
        else:
            raise CheckpointError(f"unexpected key {key!r} in a GSMN graph state dict")
    return out


def convert(official: dict[str, Any], where: str = "checkpoint") -> tuple[GsmnConfig, dict[str, torch.Tensor]]:
    """(config, state dict) from an original GSMN checkpoint."""
    opt = official["opt"]
    img_sd, txt_sd, vis_sd, txt_graph_sd = (dict(sd) for sd in official["model"])
    need = [("fc.weight", img_sd), ("embed.weight", txt_sd), ("graph_convolution_1.mean_rho", vis_sd),
            ("graph_convolution_3.params", txt_graph_sd), ("out_1.weight_v", vis_sd)]
    missing = [k for k, sd in need if k not in sd]
    if missing:
        raise CheckpointError(f"{where}: not a GSMN checkpoint (missing {', '.join(missing)})")
    embed_dim, image_dim = img_sd["fc.weight"].shape
    vocab_size, word_dim = txt_sd["embed.weight"].shape
    n_kernels = vis_sd["graph_convolution_1.mean_rho"].shape[0]
    hid_dim = vis_sd["out_1.weight_v"].shape[0]
    num_block = vis_sd["graph_convolution_1.conv_weights.0.weight"].shape[1]
    if int(getattr(opt, "num_block", num_block)) != num_block:
        raise CheckpointError(f"{where}: opt.num_block={opt.num_block} but the graphs take {num_block} inputs")
    cfg = GsmnConfig(
        image_dim=int(image_dim), embed_dim=int(embed_dim), word_dim=int(word_dim), vocab_size=int(vocab_size),
        num_layers=int(getattr(opt, "num_layers", 1)), bi_gru=any(k.endswith("_reverse") for k in txt_sd),
        no_imgnorm=bool(getattr(opt, "no_imgnorm", False)), no_txtnorm=bool(getattr(opt, "no_txtnorm", False)),
        lambda_softmax=float(opt.lambda_softmax), num_block=int(num_block), hid_dim=int(hid_dim),
        out_dim=int(vis_sd["out_2.weight_v"].shape[0]), n_kernels=int(n_kernels),
        sparse=bool(getattr(opt, "is_sparse", False)), text_ids="precaps_stan",
    )
    state = {f"img_enc.{k}": v for k, v in img_sd.items()}
    state |= {f"txt_enc.{k}": v for k, v in txt_sd.items()}
    state |= _graph(vis_sd, "graph_convolution_1", "i2t_graph")
    state |= _graph(txt_graph_sd, "graph_convolution_3", "t2i_graph")
    return cfg, state
