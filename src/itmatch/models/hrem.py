"""HREM — Fu, Zhang, Mao, Wang and Zhang, "Learning Semantic Relationship among Instances for Image-Text Matching",
CVPR 2023.

Port of github.com/CrossmodalGroup/HREM @ 1ad2612 (`lib/encoders.py`, `lib/mlp.py`, `lib/loss.py`, `lib/mca.py`,
`graph_lib.py`, `lib/vse.py`), region features with BERT text. Both encoders turn their fragments x (regions:
`fc(v) + MLP(v)`, the MLP as VSE-infinity's; words: `Linear(BERT)`) into

    emb = l2norm(rho * top2mean(x) + (1 - rho) * mean(Transformer(x)))       rho = residual_weight = 0.8

over the valid positions (one post-norm transformer layer, 16 heads, FFN = D; l2norm adds 1e-8 to the norm).
Similarity = dot product, exactly as VSE-infinity: this is all a checkpoint holds and all evaluation runs.

Training adds the instance-level relation graph (`itmatch.modules.instance_graph`) after `warmup_iterations`
steps: loss = T(img, cap) + [T(img, cap_g) + T(img_g, cap) + T(img_g, cap_g)] + reg_loss_weight * KL, T the
distance-weighted sampled triplet loss over pairs grouped by image id, *_g the graph-enhanced embeddings. The graph
and the iteration counter are training-only state (`training_state_dict`), never in `state_dict()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from itmatch.errors import CheckpointError, ConfigError, DataError
from itmatch.losses import distance_weighted_triplet_loss, hinge_loss
from itmatch.models.base import Encoded, RetrievalModel, check_data_sizes
from itmatch.modules.instance_graph import InstanceGraph
from itmatch.modules.norm import l2norm
from itmatch.modules.pooling import masked_mean_pool, topk_mean_pool
from itmatch.modules.region_mlp import FcMlp
from itmatch.modules.text_bert import bert_tokens, load_bert
from itmatch.modules.transformer import encode_set, post_norm_encoder
from itmatch.registry import register_model

GRAPH = "graph"  # name of the training-only submodule
_EPS = 1e-8  # upstream l2norm adds 1e-8 to the norm
_TOP_K = 2  # upstream Maxk_Pooling_Variable(k=2)


@dataclass(frozen=True, slots=True)
class HremConfig:
    name: Literal["hrem"] = "hrem"
    image_dim: int = 0  # 0 = taken from the data at training time
    embed_dim: int = 1024
    text_encoder: Literal["bert"] = "bert"  # the original has BERT text only
    bert_path: str = ""  # local BERT directory (config, weights, vocab.txt) or pkg:PACKAGE/SUBDIR
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    nhead: int = 16  # heads of the pooling transformers and of the graph transformer (upstream shares --nhead)
    dropout: float = 0.1  # their dropout (shared as well)
    residual_weight: float = 0.8  # weight of the top-2 mean against the transformer mean
    # Training-only relation graph (graph_lib.extra_parameters defaults).
    warmup_iterations: int = 8000  # training steps before the graph and its losses switch on
    graph_layers: int = 1  # --num_layers_enc
    graph_lr_factor: float = 1.0
    mask_weight: float = 1.0  # upstream README: 1.0 for Flickr30K, 1.5 for COCO
    threshold: float = 0.5  # fraction of each row's nodes connected
    relation_topk: int = 10  # word-region matches fed to the relevance MLPs
    reg_loss_weight: float = 10.0
    norm_input: bool = True  # graph nodes are the normalised embeddings (False: before l2norm)
    cross_loss: bool = True  # also T(img, cap_g) and T(img_g, cap)
    triplet_cutoff: float = 1.7  # distance above which negatives are never sampled; upstream 1.9 for COCO
    # Not upstream (0 = the original): epochs in which the base term is VSE0 (the hinge summed over every negative
    # of the batch) instead of the sampled triplet loss, whose 512-d distance weighting picks practically the
    # hardest negative from the first step. For training from scratch on the synthetic data (hrem_synth_minilm).
    vse_mean_warmup_epochs: int = 0


def _xavier(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):  # upstream init_weights: Xavier-uniform weights, zero bias
        r = math.sqrt(6.0 / (module.in_features + module.out_features))
        nn.init.uniform_(module.weight, -r, r)
        nn.init.zeros_(module.bias)


def mixed_pool(x: torch.Tensor, lengths: torch.Tensor, aggr: nn.TransformerEncoder,
               residual_weight: float) -> torch.Tensor:
    """(B, L, D) fragments -> (B, D): rho * top-2 mean + (1 - rho) * mean of the transformer outputs."""
    top = topk_mean_pool(x, lengths, _TOP_K)
    return residual_weight * top + (1 - residual_weight) * masked_mean_pool(encode_set(aggr, x, lengths), lengths)


class HremRegionEncoder(nn.Module):
    """Upstream `EncoderImageAggr`: (B, K, image_dim), lengths -> (embedding, unnormalised, fragments (B, K, D))."""

    def __init__(self, cfg: HremConfig, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc = FcMlp(cfg.image_dim, cfg.embed_dim // 2, cfg.embed_dim, **dd)
        self.fc.apply(_xavier)  # every Linear of FC_MLP (VSE-infinity initialises only the fc)
        self.aggr = post_norm_encoder(cfg.embed_dim, cfg.nhead, cfg.embed_dim, cfg.dropout, **dd)
        self.residual_weight, self.no_norm = cfg.residual_weight, cfg.no_imgnorm

    def forward(self, images: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fragments = self.fc(images)
        raw = mixed_pool(fragments, lengths, self.aggr, self.residual_weight)
        return (raw if self.no_norm else l2norm(raw, eps=_EPS)), raw, fragments


class HremBertText(nn.Module):
    """Upstream `EncoderText_BERT`: BERT -> Linear(hidden, D) -> the same pooling as the images."""

    def __init__(self, cfg: HremConfig, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.bert = load_bert(cfg.bert_path, **dd)
        # Upstream hard-codes 768 (bert-base); the size comes from the BERT config here. Default init, as upstream.
        self.linear = nn.Linear(self.bert.config.hidden_size, cfg.embed_dim, **dd)
        self.aggr = post_norm_encoder(cfg.embed_dim, cfg.nhead, cfg.embed_dim, cfg.dropout, **dd)
        self.residual_weight, self.no_norm = cfg.residual_weight, cfg.no_txtnorm

    def forward(self, captions: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fragments = self.linear(bert_tokens(self.bert, captions))  # lengths count [CLS] and [SEP]
        raw = mixed_pool(fragments, lengths, self.aggr, self.residual_weight)
        return (raw if self.no_norm else l2norm(raw, eps=_EPS)), raw, fragments


class Hrem(RetrievalModel):
    # The instance graph relates every caption's words to every image's regions within the batch: those features
    # are not gathered across torchrun processes, so HREM trains in one process.
    global_batch_loss = False
    extra_inputs = ("image_ids",)  # the loss groups the captions of one image

    def __init__(self, cfg: HremConfig, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        dd = {"device": device, "dtype": dtype}
        self.img_enc = HremRegionEncoder(cfg, **dd)
        self.txt_enc = HremBertText(cfg, **dd)
        self.graph = InstanceGraph(cfg.embed_dim, nhead=cfg.nhead, dropout=cfg.dropout, num_layers=cfg.graph_layers,
                                   topk=cfg.relation_topk, threshold=cfg.threshold, mask_weight=cfg.mask_weight,
                                   **dd)
        self.iterations = 0  # training steps seen (upstream GraphLoss.iter_count); resumes via training_state_dict
        self.register_state_dict_post_hook(_drop_graph_weights)
        self.register_load_state_dict_post_hook(_ignore_missing_graph_weights)

    def encode_image(self, images: torch.Tensor, lengths: torch.Tensor | None = None) -> Encoded:
        """images (B, K, image_dim); lengths (B,) valid regions (default: all K, as at evaluation)."""
        return Encoded(self.img_enc(images, self._image_lengths(images, lengths))[0])

    def encode_text(self, captions: torch.Tensor, lengths: torch.Tensor) -> Encoded:
        return Encoded(self.txt_enc(captions, lengths)[0])

    @staticmethod
    def _image_lengths(images: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        if images.ndim != 3:
            raise DataError(f"hrem needs region features (N, regions, dim), got {tuple(images.shape)}")
        if lengths is None:
            return torch.full((len(images),), images.shape[1], dtype=torch.long, device=images.device)
        return lengths

    def graph_active(self) -> bool:
        return self.iterations >= self.cfg.warmup_iterations

    def training_loss(self, images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, *, epoch: int,
                      image_lengths: torch.Tensor | None = None,
                      image_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Upstream `GraphLoss.forward`; `image_ids` (B,) groups the captions of one image (default: all distinct)."""
        cfg = self.cfg
        img, img_raw, regions = self.img_enc(images, self._image_lengths(images, image_lengths))
        cap, cap_raw, words = self.txt_enc(captions, lengths)
        ids = torch.arange(len(img), device=img.device) if image_ids is None else image_ids.to(img.device)
        kw = {"cutoff": cfg.triplet_cutoff, "margin": self.margin}
        if epoch < cfg.vse_mean_warmup_epochs:
            base = hinge_loss(img @ cap.T, margin=self.margin, max_violation=False)
        else:
            base = distance_weighted_triplet_loss(img @ cap.T, ids, **kw)
        terms = {"base": base}
        if self.graph_active():
            nodes = None if cfg.norm_input else (img_raw, cap_raw)
            img_g, cap_g, reg = self.graph(img, cap, regions, words, lengths, nodes)
            graph = img.new_zeros(())
            if cfg.cross_loss:  # upstream order (it matters for the sampled negatives): (img, cap_g), (img_g, cap)
                graph = (distance_weighted_triplet_loss(img @ cap_g.T, ids, **kw)
                         + distance_weighted_triplet_loss(img_g @ cap.T, ids, **kw))
            graph = graph + distance_weighted_triplet_loss(img_g @ cap_g.T, ids, **kw)
            terms |= {"graph": graph, "reg": reg}
            base = base + graph + cfg.reg_loss_weight * reg
        self.iterations += 1  # upstream counts after the forward, so step `warmup` is the first with the graph
        return {"loss": base, **terms}

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """AdamW, weight decay 1e-4: text without BERT (lr), BERT (0.1 lr), image (lr), graph (lr x graph factor)."""
        bert = {id(p) for p in self.txt_enc.bert.parameters()}
        trainable = [p for p in self.txt_enc.parameters() if p.requires_grad]
        return torch.optim.AdamW([
            {"params": [p for p in trainable if id(p) not in bert], "lr": lr},
            {"params": [p for p in trainable if id(p) in bert], "lr": 0.1 * lr},
            {"params": [p for p in self.img_enc.parameters() if p.requires_grad], "lr": lr},
            {"params": list(self.graph.parameters()), "lr": lr * self.cfg.graph_lr_factor},
        ], lr=lr, weight_decay=1e-4)

    def training_state_dict(self) -> dict[str, Any]:
        return {GRAPH: self.graph.state_dict(), "iterations": self.iterations}

    def load_training_state_dict(self, state: dict[str, Any]) -> None:
        if GRAPH not in state or "iterations" not in state:
            raise CheckpointError("hrem: the checkpoint has no relation-graph state to resume from")
        self.graph.load_state_dict(state[GRAPH])
        self.iterations = int(state["iterations"])


def _drop_graph_weights(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state if k.startswith(f"{prefix}{GRAPH}.")]:
        del state[key]


def _ignore_missing_graph_weights(module: nn.Module, incompatible: Any) -> None:
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                    if not (k.startswith(f"{GRAPH}.") or f".{GRAPH}." in k)]


@register_model("hrem", HremConfig)
def build(cfg: HremConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Hrem:
    check_data_sizes(cfg, vocab=False)
    if cfg.embed_dim % cfg.nhead:
        raise ConfigError(f"hrem: model.embed_dim={cfg.embed_dim} must be a multiple of model.nhead={cfg.nhead}")
    if not 0 < cfg.threshold <= 1:
        raise ConfigError(f"hrem: model.threshold must be in (0, 1], got {cfg.threshold}")
    if cfg.vse_mean_warmup_epochs < 0:
        raise ConfigError("hrem: model.vse_mean_warmup_epochs must be >= 0 (0 = the original's loss throughout)")
    if cfg.relation_topk < 1 or cfg.warmup_iterations < 0:
        raise ConfigError("hrem: model.relation_topk must be >= 1 and model.warmup_iterations >= 0")
    return Hrem(cfg, device=device, dtype=dtype)
