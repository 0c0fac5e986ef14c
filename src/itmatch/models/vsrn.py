"""VSRN — Li et al., "Visual Semantic Reasoning for Image-Text Matching", ICCV 2019.

Port of github.com/KunpengLi1994/VSRN @ 777ae74 (model.py, GCN_lib/Rs_GCN.py, models/, misc/utils.py): region
features -> fc -> (region-axis l2norm) -> 4 residual graph convolutions -> region-axis l2norm -> GRU over the
regions, final state -> (batch norm) -> l2norm; a unidirectional GRU text encoder as VSE++; dot-product similarity;
VSE++'s hardest-negative hinge loss plus, in training only, the loss of a caption generator run on the reasoned
regions (teacher forcing, masked NLL summed over tokens and averaged over captions).

Upstream switches two steps on the exact string `data_name == 'f30k_precomp'` (model.py:225/240/260): Flickr30K
models skip the first l2norm and add a final BatchNorm1d; any other name takes the COCO path. Here they are the
explicit options `fc_region_norm` and `final_bn`; the presets set them as upstream did.

The caption branch is never part of the model's weights (upstream saves only [img_enc, txt_enc]): its modules are
kept out of `state_dict()` and travel in resumable checkpoints through `training_state_dict()`.
`caption_loss_weight = 0` removes it (no modules built; the retrieval encoders draw the same initial weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from itmatch.errors import CheckpointError, ConfigError
from itmatch.losses import caption_nll, hinge_loss
from itmatch.models.base import Encoded, RetrievalModel, check_data_sizes
from itmatch.modules.captioner import RegionCaptioner
from itmatch.modules.graph import ResidualGraphConv
from itmatch.modules.norm import l2norm
from itmatch.modules.text_gru import GruTextEncoder
from itmatch.registry import register_model

CAPTION = "caption"  # name of the training-only submodule


@dataclass(frozen=True, slots=True)
class VsrnConfig:
    name: Literal["vsrn"] = "vsrn"
    image_dim: int = 0  # 0 = taken from the data at training time
    embed_dim: int = 2048  # upstream train.py default, kept by both README commands
    word_dim: int = 300
    num_layers: int = 1  # text GRU layers
    vocab_size: int = 0  # taken from the vocabulary at training time
    gcn_layers: int = 4
    fc_region_norm: bool = True  # l2norm of the fc output over the REGION axis (upstream: all but f30k_precomp)
    final_bn: bool = False  # BatchNorm1d on the image GRU's final state (upstream: f30k_precomp only)
    caption_loss_weight: float = 1.0  # total loss = matching + weight * caption NLL; 0 = no caption branch
    caption_hidden: int = 512
    caption_word_dim: int = 300
    caption_max_len: int = 60  # captions longer than this are cut (upstream --max_len)
    caption_dropout: float = 0.2
    # Not upstream (VSRN trains with hardest negatives from the first step): epochs of the VSE0 loss (all
    # negatives) before hardest negatives, as VSE-infinity's warm-up. 0 = upstream; > 0 switches
    # `train.max_violation` on after that many epochs. The synthetic preset needs it (see vsrn_synth.toml).
    vse_mean_warmup_epochs: int = 0


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
        # Built last, so that removing it leaves the encoders' initial weights unchanged for a given seed.
        self.caption = None
        if cfg.caption_loss_weight > 0:
            self.caption = RegionCaptioner(cfg.embed_dim, cfg.vocab_size, hidden=cfg.caption_hidden,
                                           word_dim=cfg.caption_word_dim, dropout=cfg.caption_dropout,
                                           device=device, dtype=dtype)
        self.register_state_dict_post_hook(_drop_caption_weights)
        self.register_load_state_dict_post_hook(_ignore_missing_caption_weights)

    def encode_image(self, images: torch.Tensor) -> Encoded:
        return Encoded(self.img_enc(images)[0])

    def encode_text(self, captions: torch.Tensor, lengths: torch.Tensor) -> Encoded:
        return Encoded(l2norm(self.txt_enc(captions, lengths), dim=-1))

    def on_epoch_start(self, epoch: int) -> None:
        if self.cfg.vse_mean_warmup_epochs > 0 and epoch >= self.cfg.vse_mean_warmup_epochs:
            self.max_violation = True

    def selection_score(self, results: dict) -> float:
        """Upstream train.py:validate selects on R@1 + R@5 in both directions (R@10 left out)."""
        i2t, t2i = results["i2t"], results["t2i"]
        return float(i2t["R@1"] + i2t["R@5"] + t2i["R@1"] + t2i["R@5"])

    def training_loss(self, images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
                      *, epoch: int) -> dict[str, torch.Tensor]:
        img_emb, regions = self.img_enc(images)
        sims = self.global_batch(img_emb) @ self.global_batch(self.encode_text(captions, lengths).emb).T
        matching = hinge_loss(sims, margin=self.margin, max_violation=self.max_violation)
        if self.caption is None:
            return {"loss": matching}
        labels, mask = caption_targets(captions, lengths, self.cfg.caption_max_len)
        # Upstream decodes max_len - 1 steps whatever the batch; steps past the longest mask contribute 0.
        steps = min(self.cfg.caption_max_len - 1, int(mask.sum(dim=1).max()) - 1)
        logprobs = self.caption(regions, labels[:, :steps])
        caption = caption_nll(logprobs, labels[:, 1 : steps + 1], mask[:, 1 : steps + 1].to(logprobs.dtype))
        return {"loss": matching + self.cfg.caption_loss_weight * caption, "matching": matching, "caption": caption}

    # Upstream's Adam (model.py VSRN.__init__) lists the caption encoder/decoder parameters twice, so under torch
    # 0.4.1 they took two Adam steps per batch and counted twice in the gradient clip. torch 2.x warns about (and
    # will refuse) duplicate parameters; we list each parameter once: the caption branch trains at the plain rate.

    def training_state_dict(self) -> dict[str, Any]:
        return {} if self.caption is None else {CAPTION: self.caption.state_dict()}

    def load_training_state_dict(self, state: dict[str, Any]) -> None:
        if (CAPTION in state) != (self.caption is not None):
            raise CheckpointError("the checkpoint's caption branch does not match model.caption_loss_weight")
        if self.caption is not None:
            self.caption.load_state_dict(state[CAPTION])


def _drop_caption_weights(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state if k.startswith(f"{prefix}{CAPTION}.")]:
        del state[key]


def _ignore_missing_caption_weights(module: nn.Module, incompatible: Any) -> None:
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                    if not (k.startswith(f"{CAPTION}.") or f".{CAPTION}." in k)]


@register_model("vsrn", VsrnConfig)
def build(cfg: VsrnConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Vsrn:
    check_data_sizes(cfg)
    if cfg.caption_loss_weight < 0:
        raise ConfigError("vsrn: model.caption_loss_weight must be >= 0 (0 removes the caption branch)")
    if cfg.vse_mean_warmup_epochs < 0:
        raise ConfigError("vsrn: model.vse_mean_warmup_epochs must be >= 0 (0 = hardest negatives throughout)")
    if cfg.caption_max_len < 2:
        raise ConfigError("vsrn: model.caption_max_len must be >= 2")
    return Vsrn(cfg, device=device, dtype=dtype)
