"""Similarity matrices scored in tiles of images x captions, split over torchrun ranks and resumable from disk.

`torchrun --nproc_per_node N -m itmatch eval CKPT ...` starts N copies of the evaluator. Each encodes the split (a
linear cost), then scores the tiles of the (n_images, n_captions) matrix whose index is its rank modulo N (the
quadratic cost: 125 million cross-attended pairs for COCO 5K); rank 0 gathers the tiles, assembles the matrix and
runs the protocol. With `--fold5` only the five diagonal blocks are tiled, as `inference.compute_fold_sims` scores.

A tile is one `inference.similarity_matrix` call on its rows and columns, so the default geometry (1024 images, every
caption of the block: the chunks one process scores) gives the same matrix bit for bit in any number of processes;
smaller tiles change only the rounding of the products they split (none for cross attention, whose pairs are scored
one by one, and none observed for dot products; the tests check 1e-12).

With a tiles directory every finished tile is written atomically to DIR/FINGERPRINT/TILE.npy and read back instead of
being scored again after an interruption. The fingerprint covers the weights (SHA-256 of the state dict), the model
config, the split's files (path, size, mtime) and captions, and every option that can change a score (dtype, fold5,
evaluation options, batch size, tile geometry) and the itmatch version, so tiles of another model or data are never
mixed in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itmatch import distributed
from itmatch.fileio import atomic_write
from itmatch.inference import caption_rows, encode_split, similarity_matrix
from itmatch.models.base import Encoded, RetrievalModel

_logger = logging.getLogger(__name__)

TILE_IMAGES = 1024  # inference.similarity_matrix's chunk: tiles of this height reproduce one process bit for bit
FOLDS = 5


@dataclass(frozen=True)
class Tile:
    """Images [image_start, image_stop) x captions [caption_start, caption_stop) of block `block` (a fold with
    fold5, else 0), indices within the block."""

    index: int
    block: int
    image_start: int
    image_stop: int
    caption_start: int
    caption_stop: int


def plan_tiles(n_images: int, n_captions: int, *, folds: int = 0, tile_images: int = TILE_IMAGES,
               tile_captions: int = 0) -> list[Tile]:
    """The tiles of a (n_images, n_captions) matrix, or of its `folds` diagonal blocks; `tile_captions` 0 = all the
    block's captions in one tile."""
    if tile_images < 1 or tile_captions < 0:
        raise ValueError(f"tiles need tile_images >= 1 and tile_captions >= 0, got {tile_images}, {tile_captions}")
    blocks = folds or 1
    if n_images % blocks:
        raise ValueError(f"{folds}-fold evaluation needs a multiple of {folds} images, got {n_images}")
    rows, cols = n_images // blocks, n_captions // blocks
    width = tile_captions or cols
    tiles = []
    for block in range(blocks):
        for i0 in range(0, rows, tile_images):
            for c0 in range(0, cols, width):
                tiles.append(Tile(len(tiles), block, i0, min(i0 + tile_images, rows), c0, min(c0 + width, cols)))
    return tiles


def fingerprint(model: RetrievalModel, split: Any, settings: Mapping[str, Any]) -> str:
    """SHA-256 of what a tile's scores depend on: weights, model config, the split's files and captions, and the
    scoring `settings`."""
    from itmatch import __version__
    from itmatch.search import weights_sha256

    files = []
    for path in sorted(Path(split.root).glob(f"{split.split}_*")):
        stat = path.stat()
        files.append([path.name, stat.st_size, stat.st_mtime_ns])
    record = {
        "itmatch": __version__,
        "weights": weights_sha256(model),
        "model": repr(model.cfg),
        "data": {"root": str(Path(split.root).resolve()), "split": split.split, "n_images": split.n_images,
                 "files": files,
                 "captions": hashlib.sha256("\n".join(split.captions).encode()).hexdigest()},
        "settings": {k: settings[k] for k in sorted(settings)},
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class TileStats:
    """What this rank did: tiles in the plan, tiles it scored, tiles it read back from the tiles directory."""

    tiles: int = 0
    scored: int = 0
    reused: int = 0


@contextlib.contextmanager
def process_group(device: str) -> Iterator[str]:
    """Join torchrun's process group for the duration (nothing in one process); yields this rank's device."""
    joined = distributed.launched_by_torchrun() and not distributed.active()
    _, dev = distributed.setup(device)
    try:
        yield str(dev)
    finally:
        if joined:
            distributed.teardown()


def is_main() -> bool:
    return not distributed.active() or torch.distributed.get_rank() == 0


def sharded_sims(model: RetrievalModel, split: Any, vocab: Any, *, fold5: bool = False, batch_size: int = 128,
                 device: torch.device | str = "cpu", progress: bool = False, dtype: torch.dtype | None = None,
                 options: Mapping[str, Any] | None = None, tiles_dir: str | Path | None = None,
                 tile_images: int = TILE_IMAGES, tile_captions: int = 0,
                 on_tile: Callable[[Tile], None] | None = None) -> tuple[np.ndarray | None, TileStats]:
    """`inference.compute_sims` (or `compute_fold_sims` with `fold5`), scored tile by tile over the ranks of the
    process group (one process without one), resumable from `tiles_dir`.

    Returns (the matrix on rank 0, None on the others; this rank's `TileStats`). `on_tile(tile)` is called after
    each tile this rank scores (not after those read back).
    """
    rank = torch.distributed.get_rank() if distributed.active() else 0
    world = torch.distributed.get_world_size() if distributed.active() else 1
    n_images, n_captions = split.n_images, len(split.captions)
    folds = FOLDS if fold5 else 0
    tiles = plan_tiles(n_images, n_captions, folds=folds, tile_images=tile_images, tile_captions=tile_captions)
    mine = [t for t in tiles if t.index % world == rank]
    encode_options = {**(options or {}), **({"fold5": True} if fold5 else {})}
    where = None
    if tiles_dir is not None:
        settings = {"fold5": fold5, "dtype": str(dtype), "options": dict(encode_options), "batch_size": batch_size,
                    "tile_images": tile_images, "tile_captions": tile_captions}
        key = fingerprint(model, split, settings)
        where = Path(tiles_dir) / key[:32]
        if rank == 0:
            where.mkdir(parents=True, exist_ok=True)
            meta = json.dumps({"fingerprint": key, "tiles": len(tiles), **settings}, indent=1).encode()
            atomic_write(where / "meta.json", lambda fh: fh.write(meta))
    stats = TileStats(tiles=len(tiles))
    encoded: tuple[Encoded, Encoded] | None = None
    was_training = model.training
    model.eval()
    done: dict[int, np.ndarray] = {}
    for tile in mine:
        path = None if where is None else where / f"{tile.index}.npy"
        shape = (tile.image_stop - tile.image_start, tile.caption_stop - tile.caption_start)
        if path is not None and path.exists():
            scores = np.load(path, allow_pickle=False)
            if scores.shape == shape and scores.dtype == np.float64:
                done[tile.index] = scores
                stats.reused += 1
                continue
        if encoded is None:  # encode only when a tile is left to score
            encoded = encode_split(model, split, vocab, batch_size=batch_size, device=device, progress=progress,
                                   options=encode_options)
        images, texts = encoded
        cpi = len(texts) // n_images
        i_base = tile.block * (n_images // (folds or 1))
        c_base = i_base * cpi
        scores = similarity_matrix(model, images.rows(i_base + tile.image_start, i_base + tile.image_stop),
                                   caption_rows(texts, c_base + tile.caption_start, c_base + tile.caption_stop),
                                   device=device, dtype=dtype)
        if path is not None:
            atomic_write(path, lambda fh, s=scores: np.save(fh, s, allow_pickle=False))
        done[tile.index] = scores
        stats.scored += 1
        if on_tile is not None:
            on_tile(tile)
    model.train(was_training)
    _logger.info("rank %d: %d tiles scored, %d read back (%d in all)", rank, stats.scored, stats.reused, len(tiles))
    if world > 1:
        gathered: list[Any] = [None] * world if rank == 0 else []
        torch.distributed.gather_object(done, gathered if rank == 0 else None, dst=0)
        if rank != 0:
            return None, stats
        done = {k: v for part in gathered for k, v in part.items()}
    return _assemble(tiles, done, n_images, n_captions, folds), stats


def _assemble(tiles: list[Tile], done: dict[int, np.ndarray], n_images: int, n_captions: int,
              folds: int) -> np.ndarray:
    blocks = folds or 1
    out = np.empty((blocks, n_images // blocks, n_captions // blocks), dtype=np.float64)
    for tile in tiles:
        out[tile.block, tile.image_start : tile.image_stop, tile.caption_start : tile.caption_stop] = done[tile.index]
    return out if folds else out[0]
