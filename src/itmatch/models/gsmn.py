"""GSMN — Liu et al., "Graph Structured Network for Image-Text Matching", CVPR 2020.

Port of github.com/CrossmodalGroup/GSMN @ dcc0f61 (models released at 490d787): SCAN's region fc encoder and
bi-GRU text encoder (eps added to the l2 norms), node-level matching by cross attention in both directions with a
16-block cosine, structure-level matching over a visual graph (polar Gaussian kernels on box centres,
`modules/geometry.py`) and a textual graph (dense intra-caption attention or the sparse dependency graph),
weight-normed heads; score = visual + textual. Scoring runs in tiles of images x captions
(`modules/graph_matching.py`), never one caption at a time.

Inputs beyond SCAN's: boxes (N, R, 4) normalised to the image size, per image, and (sparse variant) the
dependency pairs of each caption. The encoders append the one-sided graph coefficients to the node features
(regions: the kernel-weight sums of the visual graph; words: those of the textual graph), so encoded galleries
flow through the shared evaluation code unchanged: `emb` is (N, nodes, embed_dim + n_kernels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from itmatch.errors import ConfigError
from itmatch.losses import hinge_loss
from itmatch.models.base import Encoded, RetrievalModel, check_data_sizes
from itmatch.models.scan import RegionFcEncoder
from itmatch.modules.cross_attention import gather_words
from itmatch.modules.geometry import PolarGaussianKernels
from itmatch.modules.graph_matching import (
    ImageTile,
    MatchHead,
    WordGraphKernels,
    gsmn_tile_scores,
    gsmn_tiles,
    prepare_captions,
    prepare_images,
    sparse_adjacency,
)
from itmatch.modules.norm import l2norm
from itmatch.modules.text_gru import GruTextEncoder
from itmatch.modules.workspace import Workspace, run_tiles
from itmatch.registry import register_model

EPS = 1e-8

Dependencies = Sequence[Sequence[Sequence[int]]]  # per caption: [[governor, dependent], ...] (CoreNLP indices)


@dataclass(frozen=True, slots=True)
class GsmnConfig:
    name: Literal["gsmn"] = "gsmn"
    image_dim: int = 0  # 0 = taken from the data at training time
    embed_dim: int = 1024
    word_dim: int = 300
    num_layers: int = 1
    vocab_size: int = 0  # taken from the vocabulary at training time
    bi_gru: bool = True  # every README command passes --bi_gru
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    lambda_softmax: float = 9.0  # upstream argparse default; the README uses 20 (F30K) and 10 (COCO)
    num_block: int = 16  # blocks of the multi-block cosine (= the graphs' feat_dim)
    hid_dim: int = 32
    out_dim: int = 1
    n_kernels: int = 8
    sparse: bool = False  # upstream --is_sparse: the textual graph follows the dependency parse
    # Where caption ids come from: the dataset vocabulary applied to {split}_caps.txt, or the ids of
    # {split}_precaps_stan.txt (the original's pre-tokenised files; what its released models read).
    text_ids: Literal["vocab", "precaps_stan"] = "vocab"
    xattn_budget_mb: float = 8.0  # memory for intermediates per tile (speed, not results; small suits CPU caches)


class Gsmn(RetrievalModel):
    extra_inputs = ("boxes", "depends")
    eval_dtype = torch.float32  # upstream shard_xattn scores `.float()` copies of its float64 embeddings

    def __init__(self, cfg: GsmnConfig, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.cfg = cfg
        self.img_enc = RegionFcEncoder(cfg.image_dim, cfg.embed_dim, no_imgnorm=cfg.no_imgnorm, **dd)
        self.txt_enc = GruTextEncoder(cfg.vocab_size, cfg.word_dim, cfg.embed_dim, num_layers=cfg.num_layers,
                                      bidirectional=cfg.bi_gru, output="all", **dd)
        self.i2t_graph = nn.Module()
        self.i2t_graph.conv = PolarGaussianKernels(cfg.num_block, cfg.hid_dim, cfg.n_kernels, **dd)
        self.i2t_graph.head = MatchHead(cfg.hid_dim, cfg.out_dim, **dd)
        self.t2i_graph = nn.Module()
        self.t2i_graph.conv = WordGraphKernels(cfg.num_block, cfg.hid_dim, cfg.n_kernels, **dd)
        self.t2i_graph.head = MatchHead(cfg.hid_dim, cfg.out_dim, **dd)
        self.budget_mb = cfg.xattn_budget_mb

    def encode_image(self, images: torch.Tensor, boxes: torch.Tensor | None = None) -> Encoded:
        """(N, R, image_dim) features + (N, R, 4) normalised boxes -> (N, R, embed_dim + n_kernels)."""
        if images.ndim != 3:
            raise ConfigError(f"gsmn needs region features (N, regions, dim), got shape {tuple(images.shape)}")
        if boxes is None:
            raise ConfigError("gsmn needs the boxes of every region ({split}_ims_bbx.npy and {split}_ims_size.npy)")
        regions = self.img_enc(images)  # fc + l2norm per region (eps added to the norm)
        coef = self.i2t_graph.conv.node_coefficients(boxes.to(regions.device, regions.dtype))
        return Encoded(torch.cat([regions, coef.to(regions.dtype)], -1))

    def encode_text(self, captions: torch.Tensor, lengths: torch.Tensor,
                    depends: Dependencies | None = None) -> Encoded:
        """(B, L) ids + dependency pairs (sparse variant) -> (B, L, embed_dim + n_kernels), zero past lengths."""
        words = self.txt_enc(captions, lengths)  # (B, L, E)
        if not self.cfg.no_txtnorm:
            words = l2norm(words, dim=-1, eps=EPS)
        adjacency = None
        if self.cfg.sparse:
            if depends is None:
                raise ConfigError("gsmn sparse needs the dependency pairs of every caption ({split}_caps.json)")
            adjacency = dependency_adjacency(depends, lengths, words.shape[1]).to(words.device, words.dtype)
        coef = self.t2i_graph.conv.node_coefficients(words, lengths, self.cfg.lambda_softmax, adjacency)
        return Encoded(torch.cat([words, coef.to(words.dtype)], -1), lengths)

    def similarity(self, images: Encoded, texts: Encoded) -> torch.Tensor:
        assert texts.lengths is not None
        d = self.cfg.embed_dim
        feats = images.emb
        ni, r, _ = feats.shape
        lengths = texts.lengths.to(torch.long).to(texts.emb.device)
        offsets = None if texts.offsets is None else texts.offsets.to(torch.long).to(texts.emb.device)
        nc = len(lengths)
        order = torch.argsort(lengths.cpu(), descending=True, stable=True)
        vis = self.i2t_graph.conv
        txt = self.t2i_graph.conv
        visual = (vis.stacked_weight(), vis.stacked_bias(), self.i2t_graph.head)
        textual = (txt.stacked_weight(), txt.stacked_bias(), self.t2i_graph.head)
        by_length = feats.new_empty((ni, nc))  # columns in `order`, scattered back once at the end
        # The image side of every tile, computed once per call (about 120 KB per image at the F30K sizes).
        image_side = prepare_images(feats[..., :d], feats[..., d:], n_blocks=self.cfg.num_block, visual=visual,
                                    n_kernels=self.cfg.n_kernels)
        image_tiles: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, ImageTile]] = {}
        tiles = []  # (first column, columns, images per tile, longest caption): caption tiles in length order
        start = 0
        while start < nc:
            longest = int(lengths[order[start]])
            ti, tc = gsmn_tiles(ni, nc - start, r, longest, self.cfg.num_block, feats.element_size(), self.budget_mb)
            tiles.append((start, tc, ti, longest))
            start += tc

        def score(tile: tuple[int, int, int, int], workspace: Workspace) -> None:
            """One caption tile against every image tile."""
            start, tc, ti, longest = tile
            cols = order[start : start + tc].to(texts.emb.device)
            caps = gather_words(texts.emb, lengths, offsets, cols, longest).to(feats.device, feats.dtype)
            lens = lengths[cols].to(feats.device)
            prepared = prepare_captions(caps[..., :d], caps[..., d:], lens, n_blocks=self.cfg.num_block,
                                        textual=textual, n_kernels=self.cfg.n_kernels)
            for i0 in range(0, ni, ti):
                if (i0, ti) not in image_tiles:
                    block = feats[i0 : i0 + ti]
                    image_tiles[i0, ti] = block[..., :d], block[..., d:], image_side.rows(i0, i0 + ti)
                regions, coef, image_tile = image_tiles[i0, ti]
                by_length[i0 : i0 + ti, start : start + tc] = gsmn_tile_scores(
                    regions, coef, prepared.words, caps[..., d:], lens,
                    n_blocks=self.cfg.num_block, lambda_softmax=self.cfg.lambda_softmax,
                    visual=visual, textual=textual, n_kernels=self.cfg.n_kernels, prepared=prepared,
                    prepared_images=image_tile, workspace=workspace)

        # Caption tiles side by side on the CPU threads; with autograd (training) or on a GPU, one after another.
        grad = torch.is_grad_enabled() and (feats.requires_grad or texts.emb.requires_grad)
        parallel = not grad and feats.device.type == "cpu"
        run_tiles(score, tiles, torch.get_num_threads() if parallel else 1)
        out = torch.empty_like(by_length)
        out[:, order.to(out.device)] = by_length
        return out

    def training_loss(self, images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, *, epoch: int,
                      image_lengths: torch.Tensor | None = None, boxes: torch.Tensor | None = None,
                      depends: Dependencies | None = None) -> dict[str, torch.Tensor]:
        if image_lengths is not None:
            raise ConfigError("gsmn does not support train.region_drop")
        sims = self.similarity(self.encode_image(images, boxes), self.encode_text(captions, lengths, depends))
        return {"loss": hinge_loss(sims, margin=self.margin, max_violation=self.max_violation)}


def dependency_adjacency(depends: Dependencies, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width, width) zero-padded sparse word graphs (`sparse_adjacency` per caption)."""
    if len(depends) != len(lengths):
        raise ConfigError(f"gsmn: {len(depends)} dependency lists for {len(lengths)} captions")
    out = torch.zeros(len(lengths), width, width)
    for i, (pairs, n) in enumerate(zip(depends, lengths.tolist(), strict=True)):
        out[i, :n, :n] = sparse_adjacency(pairs, n)
    return out


@register_model("gsmn", GsmnConfig)
def build(cfg: GsmnConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Gsmn:
    check_data_sizes(cfg)
    if cfg.embed_dim % cfg.num_block:
        raise ConfigError(f"gsmn: embed_dim {cfg.embed_dim} must be a multiple of num_block {cfg.num_block}")
    if cfg.hid_dim % cfg.n_kernels:
        raise ConfigError(f"gsmn: hid_dim {cfg.hid_dim} must be a multiple of n_kernels {cfg.n_kernels}")
    if cfg.out_dim != 1:
        raise ConfigError("gsmn: out_dim must be 1 (one score per node, as every released model)")
    return Gsmn(cfg, device=device, dtype=dtype)
