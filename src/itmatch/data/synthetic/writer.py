"""Writing the synthetic dataset: the splits' images in order (each from its own seeded generator), the SCAN layout
files (`{split}_ims.npy`, `_boxes.npy`, `_caps.txt`, `_ids.txt`), `scenes.jsonl`, GSMN's files and, when rendering,
the pictures and `id_mapping.json` (`generate`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from numpy.lib.format import open_memmap

from itmatch.data.synthetic.contrast import _contrast_pair
from itmatch.data.synthetic.features import N_REGIONS, _FeatureModel, _Nuisance, _nuisance, _regions
from itmatch.data.synthetic.grammar import _captions, dependency_pairs
from itmatch.data.synthetic.rendering import _render
from itmatch.data.synthetic.scene import CANVAS_H, CANVAS_W, _Obj, _sample_scene
from itmatch.errors import DataError

SPLITS_F30K = {"train": 4000, "dev": 500, "test": 1000}
SPLITS_COCO = {"train": 8000, "dev": 1000, "test": 1000, "testall": 5000}

_VARIANTS = {"f30k": (0, SPLITS_F30K), "coco": (1, SPLITS_COCO)}
_SPLIT_INDEX = {"train": 0, "dev": 1, "test": 2, "testall": 3}
_CONTRAST_SPLITS = frozenset({"test", "testall"})
_ID_STRIDE = 1_000_000
_BLOCK = 5  # contrast splits: images 5b, 5b+1 are a contrast pair, 5b+2..5b+4 single scenes (40 % in pairs)
_CHUNK_BYTES = 32 << 20  # features are computed into a buffer of this size, then copied to the memmap


@dataclass(frozen=True)
class _Image:
    """Everything written for one image."""

    scene: list[_Obj]
    captions: list[str]
    relations: list[list[int | str]]
    nuisance: _Nuisance
    group: int | None
    contrast: str | None


def _single(rng: np.random.Generator) -> _Image:
    while True:
        scene = _sample_scene(rng, int(rng.integers(2, 7)))
        caps = _captions(scene, rng)
        if caps is not None:
            return _Image(scene, caps[0], caps[1], _nuisance(rng, len(scene)), None, None)


def _pair(rng: np.random.Generator, group: int) -> tuple[_Image, _Image]:
    while True:
        made = _contrast_pair(rng)
        if made is not None:
            break
    first, second, kind, (texts1, texts2, triples1, triples2) = made
    nuisance = _nuisance(rng, len(first))
    return (
        _Image(first, texts1, triples1, nuisance, group, kind),
        _Image(second, texts2, triples2, nuisance, group, kind),
    )


def _images(seed: int, variant: int, content_split: str, n: int) -> Iterator[_Image]:
    """The split's images in order; image i depends only on (seed, variant, split, i)."""
    split_index = _SPLIT_INDEX[content_split]
    contrast = content_split in _CONTRAST_SPLITS
    i = 0
    while i < n:
        rng = np.random.default_rng([seed, variant, split_index, i])
        if contrast and i % _BLOCK == 0:
            first, second = _pair(rng, i // _BLOCK)
            if i + 1 < n:
                yield first
                yield second
                i += 2
                continue
            yield replace(first, group=None, contrast=None)  # its partner is cut off by the split size
        else:
            yield _single(rng)
        i += 1


def _scene_record(split: str, index: int, image_id: int, image: _Image) -> dict:
    return {
        "split": split,
        "index": index,
        "id": image_id,
        "objects": [
            {
                "colour": o.colour,
                "shape": o.shape,
                "size": o.size,
                "material": o.material,
                "box": list(o.box),
                "depth": o.depth,
            }
            for o in image.scene
        ],
        "relations": image.relations,
        "captions": image.captions,
        "group": image.group,
        "contrast": image.contrast,
    }


def _write_split(
    out: Path,
    split: str,
    n: int,
    *,
    seed: int,
    variant: int,
    model: _FeatureModel,
    scenes_file: TextIO,
    render: bool,
    bar: Any,
) -> None:
    """Write one split's four files and its scenes.jsonl lines, features chunk by chunk."""
    content_split = "testall" if variant == _VARIANTS["coco"][0] and split == "test" else split
    id_base = (_SPLIT_INDEX[content_split] + 1) * _ID_STRIDE
    ims_path = out / f"{split}_ims.npy"
    created = open_memmap(ims_path, mode="w+", dtype=np.float32, shape=(n, N_REGIONS, model.dim))
    del created  # the file now exists at full size; chunks are written through short-lived mappings
    boxes = open_memmap(out / f"{split}_boxes.npy", mode="w+", dtype=np.float32, shape=(n, N_REGIONS, 4))
    chunk = max(1, _CHUNK_BYTES // (N_REGIONS * model.dim * 4))
    buffer = np.empty((min(chunk, n), N_REGIONS, model.dim), dtype=np.float32)
    with (
        open(out / f"{split}_caps.txt", "w", encoding="utf-8", newline="\n") as caps_file,
        open(out / f"{split}_ids.txt", "w", encoding="utf-8", newline="\n") as ids_file,
    ):
        for index, image in enumerate(_images(seed, variant, content_split, n)):
            codes, background, region_boxes, noise_scale = _regions(image.scene, image.nuisance)
            row = index % chunk
            buffer[row] = model(codes, background, region_boxes, noise_scale, image.nuisance.noise_seed)
            boxes[index] = region_boxes
            if row == len(buffer) - 1 or index == n - 1:
                # unmapping after each chunk keeps the resident set at one chunk for many-GB files
                ims = open_memmap(ims_path, mode="r+")
                ims[index - row : index + 1] = buffer[: row + 1]
                ims.flush()
                del ims
            image_id = id_base + index
            caps_file.write("".join(c + "\n" for c in image.captions))
            ids_file.write(f"{image_id}\n")
            scenes_file.write(json.dumps(_scene_record(split, index, image_id, image)) + "\n")
            if render:
                _render(image.scene, out / "images" / f"{image_id}.png")
            bar.update(1)
    boxes.flush()
    del boxes


def _write_gsmn_files(root: Path, counts: Mapping[str, int]) -> None:
    """GSMN's files for every split: ims_bbx/ims_size (.npy), caps.json (dependency pairs), precaps_stan.txt.

    Word ids of precaps_stan.txt come from the vocabulary `itmatch data vocab` builds (train + dev captions, words
    seen at least 4 times), so they equal what that vocabulary gives; written only when a train split exists.
    """
    from itmatch.data.tokenize import tokenize
    from itmatch.data.vocab import VOCAB_THRESHOLD, build_vocab

    captions = {s: (root / f"{s}_caps.txt").read_text(encoding="utf-8").splitlines() for s in counts}
    vocab = None
    if "train" in counts:
        vocab = build_vocab([c for s in ("train", "dev") if s in captions for c in captions[s]],
                            threshold=VOCAB_THRESHOLD)
    for split, n in counts.items():
        np.save(root / f"{split}_ims_bbx.npy", np.load(root / f"{split}_boxes.npy"))
        sizes = np.empty(n, dtype=object)
        for i in range(n):
            sizes[i] = {"image_w": CANVAS_W, "image_h": CANVAS_H}
        np.save(root / f"{split}_ims_size.npy", sizes, allow_pickle=True)
        deps = [dependency_pairs(tokenize(c)) for c in captions[split]]
        (root / f"{split}_caps.json").write_text(json.dumps(deps, separators=(",", ":")) + "\n", encoding="utf-8")
        if vocab is not None:
            with open(root / f"{split}_precaps_stan.txt", "w", encoding="utf-8", newline="\n") as fh:
                fh.writelines(",".join(map(str, vocab.encode(c))) + "\n" for c in captions[split])


def generate(
    out: str | os.PathLike,
    *,
    variant: str = "f30k",
    seed: int = 0,
    dim: int = 256,
    sizes: Mapping[str, int] | None = None,
    render: bool = False,
    progress: bool = False,
) -> dict[str, int]:
    """Write the dataset to `out` (created if missing) and return {split: n_images}.

    Besides the SCAN layout it writes GSMN's files (`_write_gsmn_files`): boxes and image sizes in the original's
    names, dependency pairs from the grammar (`dependency_pairs`) and pre-tokenised word ids.

    Splits of size 0, or missing from a given `sizes`, are not written. `render` also draws every image to
    `out/images/{id}.png` and writes `out/id_mapping.json`, so that `out` is also a raw-image dataset
    (`data.source = "images"`); `progress` shows a progress bar over images.
    """
    from tqdm import tqdm

    if variant not in _VARIANTS:
        raise DataError(f"unknown synthetic variant {variant!r}; use 'f30k' or 'coco'")
    variant_index, defaults = _VARIANTS[variant]
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"synthetic seed must be a non-negative integer, got {seed!r}")
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise DataError(f"synthetic feature dim must be a positive integer, got {dim!r}")
    requested = dict(defaults if sizes is None else sizes)
    unknown = sorted(set(requested) - set(defaults))
    if unknown:
        raise DataError(f"unknown {variant} split(s) {', '.join(unknown)}; known: {', '.join(defaults)}")
    counts: dict[str, int] = {}
    for split in defaults:
        n = requested.get(split, 0)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n < _ID_STRIDE:
            raise DataError(f"size of split {split!r} must be an integer in [0, {_ID_STRIDE}), got {n!r}")
        if n:
            counts[split] = int(n)
    if variant == "coco" and counts.get("test", 0) > counts.get("testall", _ID_STRIDE):
        raise DataError("coco 'test' is the first images of 'testall' and cannot be larger than it")
    root = Path(out).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    if render:
        (root / "images").mkdir(exist_ok=True)
    model = _FeatureModel(int(seed), int(dim))
    with (
        open(root / "scenes.jsonl", "w", encoding="utf-8", newline="\n") as scenes_file,
        tqdm(total=sum(counts.values()), disable=not progress, unit="img", desc="synthetic") as bar,
    ):
        for split, n in counts.items():
            _write_split(
                root,
                split,
                n,
                seed=int(seed),
                variant=variant_index,
                model=model,
                scenes_file=scenes_file,
                render=render,
                bar=bar,
            )
    _write_gsmn_files(root, counts)
    if render:  # the raw-image layout of VSE-infinity: id -> file under images/
        mapping = {i: f"{i}.png" for split in counts for i in (root / f"{split}_ids.txt").read_text().split()}
        (root / "id_mapping.json").write_text(json.dumps(mapping) + "\n", encoding="utf-8")
    return counts


def scene_records(root: str | os.PathLike, split: str) -> list[dict]:
    """The `scenes.jsonl` records of `split` (each image's objects, group, index, id), [] where the dataset has no
    such file (a real dataset): what evaluation's contrast pairs, the demo's pictures and the server's thumbnails
    read."""
    path = Path(root) / "scenes.jsonl"
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as fh:
        return [record for record in map(json.loads, fh) if record.get("split") == split]
