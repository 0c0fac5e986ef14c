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

import argparse
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from itmatch.config import non_negative, positive
from itmatch.errors import CheckpointError, ConfigError, DataError
from itmatch.method import Importer, MethodSpec, SplitInputs
from itmatch.models.base import Encoded, RetrievalModel, check_data_sizes
from itmatch.models.scan import RegionFcEncoder
from itmatch.modules.cross_attention import caption_tiles, length_ordered_tiles
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
from itmatch.modules.norm import EPS, l2norm
from itmatch.modules.text_gru import GruTextEncoder
from itmatch.modules.workspace import Workspace, run_tiles
from itmatch.registry import register_method

Dependencies = Sequence[Sequence[Sequence[int]]]  # per caption: [[governor, dependent], ...] (CoreNLP indices)


@dataclass(frozen=True, slots=True)
class GsmnConfig:
    name: Literal["gsmn"] = "gsmn"
    image_dim: int = non_negative(0)  # 0 = taken from the data at training time
    embed_dim: int = positive(1024)
    word_dim: int = positive(300)
    num_layers: int = positive(1)
    vocab_size: int = non_negative(0)  # taken from the vocabulary at training time
    bi_gru: bool = True  # every README command passes --bi_gru
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    lambda_softmax: float = positive(9.0)  # upstream argparse default; the README uses 20 (F30K) and 10 (COCO)
    num_block: int = positive(16)  # blocks of the multi-block cosine (= the graphs' feat_dim)
    hid_dim: int = positive(32)
    out_dim: int = positive(1)
    n_kernels: int = positive(8)
    sparse: bool = False  # upstream --is_sparse: the textual graph follows the dependency parse
    # Where caption ids come from: the dataset vocabulary applied to {split}_caps.txt, or the ids of
    # {split}_precaps_stan.txt (the original's pre-tokenised files; what its released models read).
    text_ids: Literal["vocab", "precaps_stan"] = "vocab"
    xattn_budget_mb: float = positive(8.0)  # tile memory (speed, not results; small suits CPU caches)


class Gsmn(RetrievalModel):
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
        all_regions, all_coef = feats.split([d, feats.shape[-1] - d], dim=-1)
        image_side = prepare_images(all_regions, all_coef, n_blocks=self.cfg.num_block, visual=visual,
                                    n_kernels=self.cfg.n_kernels)
        tiles = length_ordered_tiles(lengths, order, lambda left, longest: gsmn_tiles(
            ni, left, r, longest, self.cfg.num_block, feats.element_size(), self.budget_mb))
        # Under autograd every slice of the batch would have a backward writing into a zero-filled tensor of the
        # whole batch, once per tile (0.4 s of a 6.8 s training step on one thread): the images are split once per
        # tile height and the captions gathered once (`caption_tiles`), so each input gets one backward.
        grad = torch.is_grad_enabled() and (feats.requires_grad or texts.emb.requires_grad)
        words_of = caption_tiles(texts.emb, lengths, offsets, order, tiles, grad=grad)

        @functools.cache
        def images_in_tiles(ti: int) -> list[tuple[torch.Tensor, torch.Tensor, ImageTile]]:
            return list(zip(all_regions.split(ti), all_coef.split(ti), image_side.split(ti), strict=True))

        def score(tile: tuple[int, int, int, int], workspace: Workspace) -> None:
            """One caption tile against every image tile."""
            start, tc, ti, _ = tile
            caps = words_of(tile).to(feats.device, feats.dtype)
            lens = lengths[order[start : start + tc].to(lengths.device)].to(feats.device)
            prepared = prepare_captions(caps[..., :d], caps[..., d:], lens, n_blocks=self.cfg.num_block,
                                        textual=textual, n_kernels=self.cfg.n_kernels)
            for i0, (regions, coef, image_tile) in zip(range(0, ni, ti), images_in_tiles(ti), strict=True):
                by_length[i0 : i0 + ti, start : start + tc] = gsmn_tile_scores(
                    regions, coef, prepared.words, caps[..., d:], lens,
                    n_blocks=self.cfg.num_block, lambda_softmax=self.cfg.lambda_softmax,
                    visual=visual, textual=textual, n_kernels=self.cfg.n_kernels, prepared=prepared,
                    prepared_images=image_tile, workspace=workspace)

        # Caption tiles side by side on the CPU threads; with autograd (training) or on a GPU, one after another.
        parallel = not grad and feats.device.type == "cpu"
        run_tiles(score, tiles, torch.get_num_threads() if parallel else 1)
        out = torch.empty_like(by_length)
        out[:, order.to(out.device)] = by_length
        return out


def dependency_adjacency(depends: Dependencies, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width, width) zero-padded sparse word graphs (`sparse_adjacency` per caption)."""
    if len(depends) != len(lengths):
        raise ConfigError(f"gsmn: {len(depends)} dependency lists for {len(lengths)} captions")
    out = torch.zeros(len(lengths), width, width)
    for i, (pairs, n) in enumerate(zip(depends, lengths.tolist(), strict=True)):
        out[i, :n, :n] = sparse_adjacency(pairs, n)
    return out


def build(cfg: GsmnConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Gsmn:
    check_data_sizes(cfg)
    if cfg.embed_dim % cfg.num_block:
        raise ConfigError(f"gsmn: embed_dim {cfg.embed_dim} must be a multiple of num_block {cfg.num_block}")
    if cfg.hid_dim % cfg.n_kernels:
        raise ConfigError(f"gsmn: hid_dim {cfg.hid_dim} must be a multiple of n_kernels {cfg.n_kernels}")
    if cfg.out_dim != 1:
        raise ConfigError("gsmn: out_dim must be 1 (one score per node, as every released model)")
    return Gsmn(cfg, device=device, dtype=dtype)

# ------------------------------------------------------------------------ released checkpoints of the original
# Import CrossmodalGroup/GSMN checkpoints (`model_best.pth.tar`): pure remapping to `GsmnConfig` + our state dict.
#
# The original saves `{'model': [img_enc, txt_enc, i2t_match_G, t2i_match_G state dicts], 'opt': Namespace, ...}`.
# Sizes come from the tensors (the vocabulary size from the embedding), switches from `opt`; the weight-normed
# heads keep their legacy `weight_g` / `weight_v` names, which `WeightNormLinear` uses too.


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


class GsmnInputs:
    """What GSMN reads besides features and word ids, and where it comes from.

    Boxes (per image): the split's `{split}_ims_bbx.npy` / `{split}_ims_size.npy`, each box divided once by its
    image's size (evaluation options `box_compat` / `box_compat_batch` reproduce the original's evaluation
    geometry instead, see `data/gsmn_files.py`); a query image brings its own. Dependency pairs (per caption, sparse
    models only): `{split}_caps.json`, or spaCy's parse of the caption's tokens for free text. Released models
    (`text_ids = "precaps_stan"`) read caption word ids from `{split}_precaps_stan.txt`, so free text cannot be
    encoded by them."""

    image = ("boxes",)

    def __init__(self, cfg: GsmnConfig) -> None:
        self.cfg = cfg
        self.caption: tuple[str, ...] = ("depends",) if cfg.sparse else ()
        self.pretokenized = cfg.text_ids == "precaps_stan"

    def for_split(self, split: Any, *, rows: Sequence[int] | None = None,
                  options: Mapping[str, Any] | None = None, captions: bool = True) -> SplitInputs:
        """Boxes of the split's images (`rows`, default every feature row) and, with `captions`, its captions'
        dependency pairs (sparse) and precaps word ids (released models)."""
        from itmatch.data.gsmn_files import split_inputs

        opts = dict(options or {})
        compat = opts.get("box_compat") or ""
        found = split_inputs(split, rows=rows, depends=self.cfg.sparse and captions,
                             precaps=self.pretokenized and captions,
                             box_compat=compat, compat_batch_size=int(opts.get("box_compat_batch") or 64),
                             fold5=bool(opts.get("fold5", False)))
        return SplitInputs(images={"boxes": found["boxes"]},
                           captions={"depends": found["depends"]} if "depends" in found else {},
                           token_ids=found.get("tokens"))

    def for_captions(self, root: Any, split: str, texts: Sequence[str]) -> SplitInputs:
        """The per-caption inputs the dataset holds for the captions `texts` of `root`/`split` (a caption gallery):
        dependency pairs from `{split}_caps.json` when present (else the caller parses the texts), precaps ids."""
        from itmatch.data.gsmn_files import read_dependencies, read_precaps

        out = SplitInputs()
        if root is None:
            if self.pretokenized:
                raise DataError(f"this model reads caption word ids from {split}_precaps_stan.txt (model.text_ids = "
                                "'precaps_stan'); pass --data DIR, the dataset the index was built from")
            return out
        if self.cfg.sparse and (root / f"{split}_caps.json").is_file():
            out.captions["depends"] = read_dependencies(root / f"{split}_caps.json", len(texts))
        if self.pretokenized:
            out.token_ids = read_precaps(root / f"{split}_precaps_stan.txt", len(texts))
            if self.cfg.sparse and "depends" not in out.captions:
                raise DataError(f"this sparse model reads precaps_stan word ids, whose dependency pairs are "
                                f"{root / f'{split}_caps.json'}, which is missing (a parse of the caption text would "
                                "not fit those ids)")
        return out

    def for_texts(self, texts: Sequence[str], parser: Any = None) -> dict[str, list]:
        """Dependency pairs of free texts (sparse models), parsed on the tokens `Vocabulary.encode` frames with
        <start> and <end>, so that pair positions are positions in the word ids; a text without words has none."""
        if not self.cfg.sparse:
            return {}
        from itmatch.data.gsmn_files import parse_dependencies
        from itmatch.data.tokenize import tokenize

        tokens = [tokenize(t) for t in texts]
        words = [t for t in tokens if t]
        parsed = iter(parse_dependencies(words, parser=parser or self.load_parser()) if words else [])
        return {"depends": [next(parsed) if t else [] for t in tokens]}

    def load_parser(self) -> Any:
        """spaCy's parser (sparse models only; None for dense ones, which parse nothing)."""
        if not self.cfg.sparse:
            return None
        from itmatch.data.gsmn_files import load_parser

        return load_parser()

    def for_image_query(self, features: np.ndarray, given: Mapping[str, Any]) -> dict[str, Any]:
        """The (R, 4) boxes of each query image (features (B, R, D)), normalised by its image's size."""
        boxes = given.get("boxes")
        if boxes is None:
            raise DataError(
                "gsmn re-ranking needs the boxes of the query image's regions: query a dataset image by its id "
                "(`itmatch search INDEX --image ID`, or `Searcher.image_inputs`), or give (regions, 4) boxes x1, "
                "y1, x2, y2 divided by the image's width and height with the features (`--image-boxes FILE`, "
                "`search_image(features, boxes=...)`)")
        arr = np.asarray(boxes, dtype=np.float32)
        arr = arr[None] if arr.ndim == 2 else arr
        if features.ndim == 3 and arr.shape != (*features.shape[:2], 4):
            raise DataError(f"boxes of shape {np.shape(boxes)} for query features of shape {features.shape}; "
                            f"expected ({features.shape[1]}, 4) per image")
        if not np.isfinite(arr).all():
            raise DataError("boxes contain NaN or infinity")
        return {"boxes": list(arr)}


SPEC = register_method(MethodSpec(
    name="gsmn", config=GsmnConfig, build=build, inputs=GsmnInputs,
    importers=(Importer(detect, convert, priority=50),),
    neutral_keys=frozenset({"xattn_budget_mb"}), memory_budget_key="xattn_budget_mb",
    eval_dtype=torch.float32,  # upstream shard_xattn scores `.float()` copies of its float64 embeddings
    eval_options=frozenset({"box_compat", "box_compat_batch"}),
))
