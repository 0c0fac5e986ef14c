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

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from itmatch.checkpoints.official import is_two_encoder_release, split_state
from itmatch.config import bounded, non_negative, positive
from itmatch.distributed import pad_to
from itmatch.errors import CheckpointError, ConfigError, DataError
from itmatch.losses import distance_weighted_triplet_loss, hinge_loss
from itmatch.method import Importer, MethodSpec
from itmatch.models.base import Encoded, RetrievalModel, check_data_sizes
from itmatch.modules.instance_graph import InstanceGraph, Matches, fragment_match
from itmatch.modules.norm import EPS, l2norm
from itmatch.modules.pooling import masked_mean_pool, topk_mean_pool
from itmatch.modules.region_mlp import FcMlp
from itmatch.modules.text_bert import STALE_BERT_KEYS, bert_tokens, load_bert, relocate_bert
from itmatch.modules.transformer import encode_set, post_norm_encoder
from itmatch.recipe import Recipe, fused
from itmatch.registry import register_method

GRAPH = "graph"  # name of the training-only submodule
_TOP_K = 2  # upstream Maxk_Pooling_Variable(k=2)


@dataclass(frozen=True, slots=True)
class HremConfig:
    name: Literal["hrem"] = "hrem"
    image_dim: int = non_negative(0)  # 0 = taken from the data at training time
    embed_dim: int = positive(1024)
    text_encoder: Literal["bert"] = "bert"  # the original has BERT text only
    bert_path: str = ""  # local BERT directory (config, weights, vocab.txt) or pkg:PACKAGE/SUBDIR
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    nhead: int = positive(16)  # heads of the pooling and graph transformers (upstream shares --nhead)
    dropout: float = bounded(0.1, ge=0, lt=1)  # their dropout (shared as well)
    residual_weight: float = bounded(0.8, ge=0, le=1)  # weight of the top-2 mean against the transformer mean
    # Training-only relation graph (graph_lib.extra_parameters defaults).
    warmup_iterations: int = non_negative(8000)  # training steps before the graph and its losses switch on
    graph_layers: int = positive(1)  # --num_layers_enc
    graph_lr_factor: float = non_negative(1.0)
    mask_weight: float = positive(1.0)  # upstream README: 1.0 for Flickr30K, 1.5 for COCO
    threshold: float = bounded(0.5, gt=0, le=1)  # fraction of each row's nodes connected
    relation_topk: int = positive(10)  # word-region matches fed to the relevance MLPs
    reg_loss_weight: float = non_negative(10.0)
    norm_input: bool = True  # graph nodes are the normalised embeddings (False: before l2norm)
    cross_loss: bool = True  # also T(img, cap_g) and T(img_g, cap)
    triplet_cutoff: float = positive(1.7)  # distance above which negatives are never sampled; upstream 1.9 for COCO
    # Not upstream (0 = the original): epochs in which the base term is VSE0 (the hinge summed over every negative
    # of the batch) instead of the sampled triplet loss, whose 512-d distance weighting picks practically the
    # hardest negative from the first step. For training from scratch on the synthetic data (hrem_synth_minilm).
    vse_mean_warmup_epochs: int = non_negative(0)


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
        return (raw if self.no_norm else l2norm(raw, eps=EPS)), raw, fragments


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
        return (raw if self.no_norm else l2norm(raw, eps=EPS)), raw, fragments


class Hrem(RetrievalModel):
    def __init__(self, cfg: HremConfig, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        dd = {"device": device, "dtype": dtype}
        self.img_enc = HremRegionEncoder(cfg, **dd)
        self.txt_enc = HremBertText(cfg, **dd)

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


class HremRecipe(Recipe):
    """Upstream `GraphLoss`: the distance-weighted triplet loss, then after `warmup_iterations` steps the instance
    graph's three extra terms and its KL regulariser; AdamW with BERT at 0.1 lr and the graph at
    `graph_lr_factor`. The graph and the iteration counter are training-only state (never in the model's weights).

    Random draws after the encoders (the sampled negatives, the graph transformer's dropout) come from a stream
    seeded by (train.seed, iteration), not from the global one, so that every torchrun rank draws what one process
    draws. Under torchrun every rank gathers the global batch's embeddings (with gradients), ids and lengths and
    computes the whole loss; only the word-region fragment matching, the quadratic part of the graph, is split: each
    rank matches its own captions' words against every image's regions, and the matches are gathered.
    """

    batch_inputs = ("image_ids",)  # the loss groups the captions of one image

    def __init__(self, model: Hrem, config: Any, collective: Any = None) -> None:
        super().__init__(model, config, collective)
        cfg = model.cfg
        weight = next(model.parameters())
        self.graph = InstanceGraph(cfg.embed_dim, nhead=cfg.nhead, dropout=cfg.dropout, num_layers=cfg.graph_layers,
                                   topk=cfg.relation_topk, threshold=cfg.threshold, mask_weight=cfg.mask_weight,
                                   device=weight.device, dtype=weight.dtype)
        self.iterations = 0  # training steps seen (upstream GraphLoss.iter_count); resumes via state_dict

    def modules(self) -> dict[str, nn.Module]:
        return {GRAPH: self.graph}

    def graph_active(self) -> bool:
        return self.iterations >= self.model.cfg.warmup_iterations

    def loss(self, images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, *, epoch: int,
             image_lengths: torch.Tensor | None = None,
             image_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Upstream `GraphLoss.forward`; `image_ids` (B,) groups the captions of one image (default: all distinct)."""
        model, cfg, group = self.model, self.model.cfg, self.collective
        if group.world_size > 1:
            # BERT's outputs at padded positions take part in the fragment matching (captions shorter than
            # relation_topk): pad the ids as one process pads the whole batch.
            captions = pad_to(captions, group.longest(captions.shape[1], captions.device), dim=1)
        img, img_raw, regions = model.img_enc(images, model._image_lengths(images, image_lengths))
        cap, cap_raw, words = model.txt_enc(captions, lengths)
        own_words, own_lengths = words, lengths
        img, img_raw, cap, cap_raw = (group.gather(x) for x in (img, img_raw, cap, cap_raw))
        ids = torch.arange(len(img), device=img.device) if image_ids is None else group.gather(image_ids.to(img.device))
        kw = {"cutoff": cfg.triplet_cutoff, "margin": self.margin}
        with self._draws(img.device):
            if epoch < cfg.vse_mean_warmup_epochs:
                base = hinge_loss(img @ cap.T, margin=self.margin, max_violation=False)
            else:
                base = distance_weighted_triplet_loss(img @ cap.T, ids, **kw)
            terms = {"base": base}
            if self.graph_active():
                matches = self._fragment_matches(regions, own_words, own_lengths)
                nodes = None if cfg.norm_input else (img_raw, cap_raw)
                img_g, cap_g, reg = self.graph(img, cap, None, None, None, nodes, matches=matches)
                graph = img.new_zeros(())
                if cfg.cross_loss:  # upstream order (it matters for the sampled negatives): (img, cap_g), (img_g, cap)
                    graph = (distance_weighted_triplet_loss(img @ cap_g.T, ids, **kw)
                             + distance_weighted_triplet_loss(img_g @ cap.T, ids, **kw))
                graph = graph + distance_weighted_triplet_loss(img_g @ cap_g.T, ids, **kw)
                terms |= {"graph": graph, "reg": reg}
                base = base + graph + cfg.reg_loss_weight * reg
        self.iterations += 1  # upstream counts after the forward, so step `warmup` is the first with the graph
        return {"loss": base, **terms}

    def _fragment_matches(self, regions: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor) -> Matches:
        """The global batch's word-region matches (no gradient): this rank's captions against every image's regions,
        gathered over ranks (caption rows of t2i, caption columns of i2t)."""
        group = self.collective
        every_region = group.gather(regions.detach())
        t2i_mean, t2i_top, i2t_mean, i2t_top = fragment_match(every_region, words.detach(), lengths,
                                                              self.graph.topk)
        return (group.gather(t2i_mean), group.gather(t2i_top), group.gather(i2t_mean.T).T,
                group.gather(i2t_top.transpose(0, 1)).transpose(0, 1))

    @contextlib.contextmanager
    def _draws(self, device: torch.device) -> Iterator[None]:
        """The random stream of this step's loss, the same on every rank and in one process."""
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.draw_seed())
            yield

    def draw_seed(self) -> int:
        """The seed of the next step's loss draws: a function of train.seed and the iteration (so it resumes)."""
        return (self.config.train.seed * 1_000_003 + 104_729 * (self.iterations + 1)) % 2**63

    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        """AdamW, weight decay 1e-4: text without BERT (lr), BERT (0.1 lr), image (lr), graph (lr x graph factor)."""
        model = self.model
        bert = {id(p) for p in model.txt_enc.bert.parameters()}
        trainable = [p for p in model.txt_enc.parameters() if p.requires_grad]
        return fused(torch.optim.AdamW, [
            {"params": [p for p in trainable if id(p) not in bert], "lr": lr},
            {"params": [p for p in trainable if id(p) in bert], "lr": 0.1 * lr},
            {"params": [p for p in model.img_enc.parameters() if p.requires_grad], "lr": lr},
            {"params": list(self.graph.parameters()), "lr": lr * model.cfg.graph_lr_factor},
        ], lr=lr, weight_decay=1e-4)

    def state_dict(self) -> dict[str, Any]:
        return {GRAPH: self.graph.state_dict(), "iterations": self.iterations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if GRAPH not in state or "iterations" not in state:
            raise CheckpointError("hrem: the checkpoint has no relation-graph state to resume from")
        self.graph.load_state_dict(state[GRAPH])
        self.iterations = int(state["iterations"])


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

# ------------------------------------------------------------------------ released checkpoints of the original
# Import released HREM checkpoints (github.com/CrossmodalGroup/HREM @ 1ad2612).
#
# Upstream `train.py` writes `{'model': [img_enc_state, txt_enc_state], 'opt': argparse.Namespace, 'epoch',
# 'best_rsum', 'Eiters'}` (a `module.` prefix only with `--multi_gpu 1`). The image state holds `fc.fc.*`,
# `fc.mlp.*` (FC_MLP) and `aggr.layers.0.*` (the pooling transformer), the text state `bert.*`, `linear.*` and
# `aggr.layers.0.*`; the relation graph lives in the training criterion and is never saved. Upstream loads the text
# state with `strict=False`; `convert` returns a state dict for a strict load and drops only
# `bert.embeddings.position_ids`, a buffer older transformers saved and newer ones recompute.


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
    txt_sd = {_strip(k): v for k, v in text.items() if _strip(k) not in STALE_BERT_KEYS}
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


def _tokenizer(cfg: HremConfig, vocab: Any) -> Any:
    from itmatch.data.wordpiece import WordpieceTokenizer

    return WordpieceTokenizer(cfg.bert_path)


SPEC = register_method(MethodSpec(
    name="hrem", config=HremConfig, build=build, recipe=HremRecipe,
    importers=(Importer(detect, convert, priority=40),),
    tokenizer=_tokenizer, uses_vocab=lambda cfg: False, relocate=relocate_bert,
    neutral_keys=frozenset({"bert_path"}), region_drop=True,
))
