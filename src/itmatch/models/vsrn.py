"""VSRN — Li et al., "Visual Semantic Reasoning for Image-Text Matching", ICCV 2019.

Port of github.com/KunpengLi1994/VSRN @ 777ae74 (model.py, GCN_lib/Rs_GCN.py, models/, misc/utils.py): region
features -> fc -> (region-axis l2norm) -> 4 residual graph convolutions -> region-axis l2norm -> GRU over the
regions, final state -> (batch norm) -> l2norm; a unidirectional GRU text encoder as VSE++; dot-product similarity;
VSE++'s hardest-negative hinge loss plus, in training only, the loss of a caption generator run on the reasoned
regions (teacher forcing, masked NLL summed over tokens and averaged over captions).

Upstream switches two steps on the exact string `data_name == 'f30k_precomp'` (model.py:225/240/260): Flickr30K
models skip the first l2norm and add a final BatchNorm1d; any other name takes the COCO path. Here they are the
explicit options `fc_region_norm` and `final_bn`; the presets set them as upstream did.

The caption branch is never part of the model's weights (upstream saves only [img_enc, txt_enc]): it belongs to
the training recipe (`VsrnRecipe`) and travels in resumable checkpoints only. `caption_loss_weight = 0` removes it
(no modules built; the retrieval encoders draw the same initial weights).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from itmatch.config import bounded, non_negative, positive
from itmatch.errors import CheckpointError, ConfigError
from itmatch.losses import caption_nll
from itmatch.method import Importer, MethodSpec
from itmatch.models.base import Encoded, RetrievalModel, check_data_sizes
from itmatch.modules.captioner import RegionCaptioner
from itmatch.modules.graph import ResidualGraphConv
from itmatch.modules.norm import l2norm
from itmatch.modules.text_gru import GruTextEncoder
from itmatch.recipe import Recipe
from itmatch.registry import register_method

CAPTION = "caption"  # name of the training-only submodule


@dataclass(frozen=True, slots=True)
class VsrnConfig:
    name: Literal["vsrn"] = "vsrn"
    image_dim: int = non_negative(0)  # 0 = taken from the data at training time
    embed_dim: int = positive(2048)  # upstream train.py default, kept by both README commands
    word_dim: int = positive(300)
    num_layers: int = positive(1)  # text GRU layers
    vocab_size: int = non_negative(0)  # taken from the vocabulary at training time
    gcn_layers: int = non_negative(4)
    fc_region_norm: bool = True  # l2norm of the fc output over the REGION axis (upstream: all but f30k_precomp)
    final_bn: bool = False  # BatchNorm1d on the image GRU's final state (upstream: f30k_precomp only)
    caption_loss_weight: float = non_negative(1.0)  # loss = matching + weight * caption NLL; 0 = no branch
    caption_hidden: int = positive(512)
    caption_word_dim: int = positive(300)
    caption_max_len: int = bounded(60, ge=2)  # captions longer than this are cut (upstream --max_len)
    caption_dropout: float = bounded(0.2, ge=0, lt=1)
    # Not upstream (VSRN trains with hardest negatives from the first step): epochs of the VSE0 loss (all
    # negatives) before hardest negatives, as VSE-infinity's warm-up. 0 = upstream; > 0 switches
    # `train.max_violation` on after that many epochs. The synthetic preset needs it (see vsrn_synth.toml).
    vse_mean_warmup_epochs: int = non_negative(0)


class VsrnImageEncoder(nn.Module):
    """(B, R, image_dim) -> embedding (B, D) and the reasoned, region-normalised features (B, R, D)."""

    def __init__(self, image_dim: int, embed_dim: int, *, gcn_layers: int = 4, fc_region_norm: bool = True,
                 final_bn: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc_region_norm = fc_region_norm
        self.fc = nn.Linear(image_dim, embed_dim, **dd)
        r = math.sqrt(6.0) / math.sqrt(image_dim + embed_dim)  # Xavier-uniform, zero bias (upstream init_weights)
        nn.init.uniform_(self.fc.weight, -r, r)
        nn.init.zeros_(self.fc.bias)
        self.rnn = nn.GRU(embed_dim, embed_dim, 1, batch_first=True, **dd)
        self.gcn = nn.ModuleList(ResidualGraphConv(embed_dim, **dd) for _ in range(gcn_layers))
        self.bn = nn.BatchNorm1d(embed_dim, **dd) if final_bn else None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.fc(images)  # (B, R, D)
        if self.fc_region_norm:
            x = l2norm(x, dim=1)  # upstream l2norm is over dim 1: the regions, not the features; no eps
        for layer in self.gcn:
            x = layer(x)
        regions = l2norm(x, dim=1)  # again over the regions
        _, h = self.rnn(regions)  # h0 = 0
        emb = h[-1]  # final hidden state (B, D); region order matters
        if self.bn is not None:
            emb = self.bn(emb)
        return l2norm(emb, dim=-1), regions


def caption_targets(captions: torch.Tensor, lengths: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption-generation labels and mask (B, max_len + 1) built from the matching captions.

    Upstream (data.py PrecompDataset.__getitem__) frames the tokens as <start> ... <end> (the matching ids),
    keeps the first `max_len` of a longer caption with its last one overwritten by <end>, pads with 0, and masks
    positions 0..z where z is the first 0: every token plus one trailing <pad>, which is thus a target too.
    """
    b, device = len(captions), captions.device
    lengths = lengths.to(device)
    n = lengths.clamp(max=max_len)
    labels = torch.zeros(b, max_len + 1, dtype=torch.long, device=device)
    width = min(captions.shape[1], max_len)
    keep = torch.arange(width, device=device)[None, :] < n[:, None]
    labels[:, :width] = torch.where(keep, captions[:, :width], 0)
    cut = torch.nonzero(lengths > max_len).flatten()
    labels[cut, n[cut] - 1] = captions[cut, lengths[cut] - 1]  # the caption's own last id, <end>
    first_pad = (labels == 0).int().argmax(dim=1)
    mask = (torch.arange(max_len + 1, device=device)[None, :] <= first_pad[:, None]).to(torch.float32)
    return labels, mask


class Vsrn(RetrievalModel):
    def __init__(self, cfg: VsrnConfig, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.img_enc = VsrnImageEncoder(cfg.image_dim, cfg.embed_dim, gcn_layers=cfg.gcn_layers,
                                        fc_region_norm=cfg.fc_region_norm, final_bn=cfg.final_bn,
                                        device=device, dtype=dtype)
        self.txt_enc = GruTextEncoder(cfg.vocab_size, cfg.word_dim, cfg.embed_dim, num_layers=cfg.num_layers,
                                      output="last", device=device, dtype=dtype)

    def encode_image(self, images: torch.Tensor) -> Encoded:
        return Encoded(self.img_enc(images)[0])

    def encode_text(self, captions: torch.Tensor, lengths: torch.Tensor) -> Encoded:
        return Encoded(l2norm(self.txt_enc(captions, lengths), dim=-1))


class VsrnRecipe(Recipe):
    """VSE++'s hinge loss (hardest negatives, after `vse_mean_warmup_epochs` of VSE0 when set) plus, in training
    only, the caption generator's loss on the reasoned regions; selection on R@1 + R@5 both ways; Adam.

    The caption branch is never part of the model's weights (upstream saves only [img_enc, txt_enc]): it lives
    here and travels in resumable checkpoints through `state_dict()`. `caption_loss_weight = 0` removes it. It is
    built right after the model (as upstream's __init__ builds it after the encoders), so that removing it leaves
    the encoders' initial weights unchanged for a given seed."""

    def __init__(self, model: Vsrn, config: Any, collective: Any = None) -> None:
        super().__init__(model, config, collective)
        cfg = model.cfg
        weight = next(model.parameters())
        self.caption = None
        if cfg.caption_loss_weight > 0:
            self.caption = RegionCaptioner(cfg.embed_dim, cfg.vocab_size, hidden=cfg.caption_hidden,
                                           word_dim=cfg.caption_word_dim, dropout=cfg.caption_dropout,
                                           device=weight.device, dtype=weight.dtype)

    def modules(self) -> dict[str, nn.Module]:
        return {} if self.caption is None else {CAPTION: self.caption}

    def on_epoch_start(self, epoch: int) -> None:
        warmup = self.model.cfg.vse_mean_warmup_epochs
        if warmup > 0 and epoch >= warmup:
            self.max_violation = True

    def selection_score(self, results: dict) -> float:
        """Upstream train.py:validate selects on R@1 + R@5 in both directions (R@10 left out)."""
        i2t, t2i = results["i2t"], results["t2i"]
        return float(i2t["R@1"] + i2t["R@5"] + t2i["R@1"] + t2i["R@5"])

    def loss(self, images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, *, epoch: int,
             image_lengths: torch.Tensor | None = None, **inputs: Any) -> dict[str, torch.Tensor]:
        cfg = self.model.cfg
        img_emb, regions = self.model.img_enc(images)
        sims = self.collective(img_emb) @ self.collective(self.model.encode_text(captions, lengths).emb).T
        matching = self.hinge(sims)
        if self.caption is None:
            return {"loss": matching}
        labels, mask = caption_targets(captions, lengths, cfg.caption_max_len)
        # Upstream decodes max_len - 1 steps whatever the batch; steps past the longest mask contribute 0.
        steps = min(cfg.caption_max_len - 1, int(mask.sum(dim=1).max()) - 1)
        logprobs = self.caption(regions, labels[:, :steps])
        caption = caption_nll(logprobs, labels[:, 1 : steps + 1], mask[:, 1 : steps + 1].to(logprobs.dtype))
        return {"loss": matching + cfg.caption_loss_weight * caption, "matching": matching, "caption": caption}

    # Upstream's Adam (model.py VSRN.__init__) lists the caption encoder/decoder parameters twice, so under torch
    # 0.4.1 they took two Adam steps per batch and counted twice in the gradient clip. torch 2.x warns about (and
    # will refuse) duplicate parameters; we list each parameter once: the caption branch trains at the plain rate.

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (CAPTION in state) != (self.caption is not None):
            raise CheckpointError("the checkpoint's caption branch does not match model.caption_loss_weight")
        super().load_state_dict(state)


def build(cfg: VsrnConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Vsrn:
    check_data_sizes(cfg)
    if cfg.caption_loss_weight < 0:
        raise ConfigError("vsrn: model.caption_loss_weight must be >= 0 (0 removes the caption branch)")
    if cfg.vse_mean_warmup_epochs < 0:
        raise ConfigError("vsrn: model.vse_mean_warmup_epochs must be >= 0 (0 = hardest negatives throughout)")
    if cfg.caption_max_len < 2:
        raise ConfigError("vsrn: model.caption_max_len must be >= 2")
    return Vsrn(cfg, device=device, dtype=dtype)

# ------------------------------------------------------------------------ released checkpoints of the original
# Import the released VSRN checkpoints (github.com/KunpengLi1994/VSRN @ 777ae74, train.py:save_checkpoint).
#
# An official file is `{'epoch', 'model': [img_enc.state_dict(), txt_enc.state_dict()], 'best_rsum', 'opt'
# (argparse.Namespace), 'Eiters'}`. Image keys: `fc.*`, `img_rnn.*`, `Rs_GCN_{1..4}.{g,theta,phi,W.0}.*` (1x1
# convolutions, weights (out, in, 1)), `Rs_GCN_k.W.1.*` (batch norm) and, for `opt.data_name == 'f30k_precomp'`
# only, `bn.*`. Text keys: `embed.weight`, `rnn.*`. The caption branch was never saved.
#
# `convert` is pure: it renames keys, squeezes the conv kernel axis, and reads the configuration from the tensors'
# shapes, except the two data-name switches, which only `opt.data_name` records (upstream tests that exact string).


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


SPEC = register_method(MethodSpec(
    name="vsrn", config=VsrnConfig, build=build, recipe=VsrnRecipe,
    importers=(Importer(detect, convert, priority=30),),
))
