"""`itmatch data check`: validate every split of a precomputed-feature dataset fully, streaming the features."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from itmatch.data.npy import MappedArray, read_npy_header
from itmatch.data.precomp import CAPTIONS_PER_IMAGE, read_captions
from itmatch.errors import DataError

_ROWS = 512  # images scanned for NaN/inf at a time


def _splits(root: Path) -> list[str]:
    names = {p.name.removesuffix("_ims.npy") for p in root.glob("*_ims.npy")}
    names |= {p.name.removesuffix("_caps.txt") for p in root.glob("*_caps.txt")}
    return sorted(names)


def _check_split(root: Path, split: str) -> tuple[str, list[str]]:
    problems: list[str] = []
    ims_path, caps_path = root / f"{split}_ims.npy", root / f"{split}_caps.txt"
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
    summary = f"{split}: {n_img if n_img is not None else '?'} images {shape or ''}, {len(caps)} captions"
    return summary, problems


def check_dataset(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Return (one summary line per split, problems found). No problems = the dataset is usable."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    if not _splits(root) and (root / "precomp").is_dir():
        root = root / "precomp"
    splits = _splits(root)
    if not splits:
        raise DataError(f"{root}: no *_ims.npy or *_caps.txt files; is this a precomp dataset directory?")
    lines, problems = [], []
    for split in splits:
        summary, found = _check_split(root, split)
        lines.append(summary)
        problems.extend(found)
    return lines, problems
