"""`itmatch data check`: validate every split of a dataset fully, streaming the features.

Precomputed-feature splits: features, captions, ids, boxes and GSMN's pixel boxes and image sizes. Raw-image splits
(no `{split}_ims.npy`, an `id_mapping.json`): captions, ids, the mapping and that every image file exists.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from itmatch.data.gsmn_files import load_image_sizes
from itmatch.data.images import find_image_dir, read_id_mapping
from itmatch.data.layout import CAPTIONS_PER_IMAGE
from itmatch.data.npy import MappedArray, read_npy_header
from itmatch.data.precomp import read_captions
from itmatch.errors import DataError

_ROWS = 512  # images scanned for NaN/inf at a time


def _has_id_mapping(root: Path) -> bool:
    parent = root.parent / "id_mapping.json"
    return (root / "id_mapping.json").is_file() or (root.name == "precomp" and parent.is_file())


def _splits(root: Path) -> list[str]:
    names = {p.name.removesuffix("_ims.npy") for p in root.glob("*_ims.npy")}
    names |= {p.name.removesuffix("_caps.txt") for p in root.glob("*_caps.txt")}
    return sorted(names)


def _check_raw_split(root: Path, split: str, image_dir: str) -> tuple[str, list[str]]:
    """A raw-image split (no features): captions, ids, their id_mapping.json entries and the image files."""
    problems: list[str] = []
    caps_path, ids_path = root / f"{split}_caps.txt", root / f"{split}_ids.txt"
    try:
        caps = read_captions(caps_path)
    except DataError as err:
        return f"{split}: ? images (raw)", [str(err)]
    ids = ids_path.read_text(encoding="utf-8", errors="replace").split()
    empty = [i + 1 for i, c in enumerate(caps) if not c]
    if empty:
        problems.append(f"{caps_path}:{empty[0]}: empty caption ({len(empty)} empty lines in total)")
    if not ids or len(caps) not in (len(ids), CAPTIONS_PER_IMAGE * len(ids)):
        problems.append(f"{ids_path}: {len(ids)} ids for {len(caps)} captions; expected one id per image "
                        f"({CAPTIONS_PER_IMAGE} captions each) or one per caption")
    try:
        mapping, mapping_path = read_id_mapping(root)
        unmapped = [i for i in ids if i not in mapping]
        if unmapped:
            problems.append(f"{mapping_path}: no entry for image id {unmapped[0]} of {ids_path} "
                            f"({len(unmapped)} ids missing)")
        images = find_image_dir(root, image_dir)
        files = sorted({mapping[i] for i in ids if i in mapping})
        missing = [f for f in files if not (images / f).is_file()]
        if missing:
            problems.append(f"{images / missing[0]}: image not found ({len(missing)} of {len(files)} missing)")
    except DataError as err:
        problems.append(str(err))
    return f"{split}: {len(ids)} images (raw), {len(caps)} captions", problems


def _check_gsmn_files(root: Path, split: str, shape: tuple[int, ...]) -> list[str]:
    """GSMN's pixel boxes (N, regions, 4) and image sizes (N entries), when present."""
    problems: list[str] = []
    bbx_path, size_path = root / f"{split}_ims_bbx.npy", root / f"{split}_ims_size.npy"
    if bbx_path.is_file():
        try:
            bshape, bdtype, _ = read_npy_header(bbx_path)
            if len(bshape) != 3 or bshape[0] != shape[0] or bshape[2] != 4 or bdtype.kind != "f" or (
                    len(shape) == 3 and bshape[1] != shape[1]):
                problems.append(f"{bbx_path}: {bdtype} {bshape} does not match features {shape} (want N, regions, 4)")
        except DataError as err:
            problems.append(str(err))
    if size_path.is_file():
        try:
            sizes = load_image_sizes(size_path)
            if len(sizes) != shape[0]:
                problems.append(f"{size_path}: {len(sizes)} image sizes for {shape[0]} images")
        except DataError as err:
            problems.append(str(err))
    return problems


def _check_split(root: Path, split: str, image_dir: str = "") -> tuple[str, list[str]]:
    problems: list[str] = []
    ims_path, caps_path = root / f"{split}_ims.npy", root / f"{split}_caps.txt"
    if not ims_path.exists() and (root / f"{split}_ids.txt").is_file() and _has_id_mapping(root):
        return _check_raw_split(root, split, image_dir)
    shape = None
    try:
        shape, dtype, _ = read_npy_header(ims_path)
        if len(shape) not in (2, 3) or dtype.kind != "f":
            problems.append(
                f"{ims_path}: expected float features of shape (N, regions, dim) or (N, dim), got {dtype} {shape}"
            )
        else:
            arr = MappedArray(ims_path)
            for start in range(0, len(arr), _ROWS):
                block = arr[start : start + _ROWS]
                bad = ~np.isfinite(block)
                if bad.any():
                    row = start + int(np.argwhere(bad)[0][0])
                    problems.append(f"{ims_path}: non-finite value (NaN/inf) in image row {row}")
                    break
            arr.close()
    except DataError as err:
        problems.append(str(err))
    n_img = shape[0] if shape else None
    try:
        caps = read_captions(caps_path)
        empty = [i + 1 for i, c in enumerate(caps) if not c]
        if empty:
            problems.append(f"{caps_path}:{empty[0]}: empty caption ({len(empty)} empty lines in total)")
        if n_img is not None and len(caps) not in (n_img, CAPTIONS_PER_IMAGE * n_img):
            problems.append(
                f"{caps_path}: {len(caps)} captions for {n_img} images; expected exactly 5 lines per image"
            )
    except DataError as err:
        caps = []
        problems.append(str(err))
    ids_path = root / f"{split}_ids.txt"
    if ids_path.is_file() and n_img is not None:
        ids = ids_path.read_text(encoding="utf-8", errors="replace").split()
        if len(ids) not in (n_img, CAPTIONS_PER_IMAGE * n_img):
            problems.append(f"{ids_path}: {len(ids)} ids for {n_img} images")
        elif not all(i.lstrip("-").isdigit() for i in ids):
            problems.append(f"{ids_path}: ids must be integers, one per line")
    boxes_path = root / f"{split}_boxes.npy"
    if boxes_path.is_file() and shape is not None:
        try:
            bshape, _, _ = read_npy_header(boxes_path)
            if bshape[0] != n_img or bshape[-1] != 4 or (len(shape) == 3 and bshape[1] != shape[1]):
                problems.append(f"{boxes_path}: shape {bshape} does not match features {shape} (want N, regions, 4)")
        except DataError as err:
            problems.append(str(err))
    if shape is not None and len(shape) in (2, 3):
        problems.extend(_check_gsmn_files(root, split, shape))
    summary = f"{split}: {n_img if n_img is not None else '?'} images {shape or ''}, {len(caps)} captions"
    return summary, problems


def check_dataset(path: str | os.PathLike, image_dir: str = "") -> tuple[list[str], list[str]]:
    """Return (one summary line per split, problems found). No problems = the dataset is usable.

    `image_dir` is the folder of a raw-image dataset's files (default: DIR/flickr30k-images or DIR/images)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    if not _splits(root) and (root / "precomp").is_dir():
        root = root / "precomp"
    splits = _splits(root)
    if not splits:
        raise DataError(f"{root}: no *_ims.npy or *_caps.txt files; is this a precomp dataset directory?")
    lines, problems = [], []
    shapes: dict[str, tuple[int, ...]] = {}
    for split in splits:
        summary, found = _check_split(root, split, image_dir)
        lines.append(summary)
        problems.extend(found)
        try:
            shapes[split] = tuple(read_npy_header(root / f"{split}_ims.npy")[0][1:])
        except DataError:
            pass
    if len(set(shapes.values())) > 1:  # a model trained on one split cannot read another
        first = next(iter(shapes))
        other = next(s for s in shapes if shapes[s] != shapes[first])
        problems.append(f"{root / f'{other}_ims.npy'}: features of shape {shapes[other]} per image, but "
                        f"{first}_ims.npy has {shapes[first]}; every split needs the same regions and dimension")
    return lines, problems
