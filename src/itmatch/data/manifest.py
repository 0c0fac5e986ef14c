"""Import a user's own image-caption pairs from a manifest (CSV with a header, or JSON Lines).

Every row names an image (a file path relative to the image folder, or an integer id) and one caption; an image may
have several rows. Rows are grouped by image in order of first appearance, captions in row order, then:

* images with more than five captions keep their first five;
* images with fewer than five are dropped (and counted): repeating captions to reach five would make one caption
  count several times in training and in recall, so only complete images are kept;
* images are split by a ratio (train, dev, test; a seeded permutation, counts rounded half up for dev and test, the
  rest train) or by a column naming each row's split (train, dev, test, testall).

Path manifests get ids 0..N-1 in order of first appearance and an ``id_mapping.json`` (the raw-image layout of the
grid models); id manifests keep their ids (for region features named by id). The files are written by
`itmatch.data.layout.write_caption_layout`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from itmatch.data.layout import CAPTIONS_PER_IMAGE, Image, check_image_files, clean_caption, write_caption_layout
from itmatch.errors import DataError

__all__ = ["SPLIT_NAMES", "ManifestImport", "import_manifest", "parse_ratios", "read_manifest"]

SPLIT_NAMES = ("train", "dev", "test", "testall")


@dataclass(frozen=True)
class Row:
    image: str
    caption: str
    split: str | None
    where: str  # "file:line" for errors


@dataclass
class ManifestImport:
    """What `import_manifest` wrote: images per split, images dropped (< 5 captions) and trimmed (> 5)."""

    rows: int = 0
    images: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    trimmed: int = 0
    vocab_size: int = 0
    id_mapping: bool = False


def parse_ratios(text: str) -> tuple[float, float, float]:
    """'0.8,0.1,0.1' -> train, dev, test fractions (non-negative, summing to 1)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise DataError(f"--split-ratio {text!r}: expected three numbers TRAIN,DEV,TEST such as 0.8,0.1,0.1") from None
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1) > 1e-6:
        raise DataError(f"--split-ratio {text!r}: expected three non-negative fractions TRAIN,DEV,TEST summing to 1")
    return values[0], values[1], values[2]


def _field(record: dict, name: str, where: str) -> str:
    value = record.get(name)
    if value is None:
        raise DataError(f"{where}: no '{name}' field")
    return str(value)


def read_manifest(path: str | os.PathLike, split_column: str | None = None) -> list[Row]:
    """Rows of a CSV (header with `image`, `caption`) or JSON Lines (objects with the same keys) manifest."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8; save the manifest as UTF-8") from None
    records: list[tuple[str, dict]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = reader.fieldnames or []
        for name in ("image", "caption", *([split_column] if split_column else [])):
            if name not in columns:
                raise DataError(f"{path}: no '{name}' column in the header ({', '.join(columns) or 'empty'})")
        records = [(f"{path}:{reader.line_num}", dict(rec)) for rec in reader]
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}: expected an object with 'image' and 'caption'")
            records.append((f"{path}:{line_no}", record))
    else:
        raise DataError(f"{path}: unknown manifest format; use .csv (header image,caption) or .jsonl")
    rows = []
    for where, record in records:
        image, caption = _field(record, "image", where).strip(), clean_caption(_field(record, "caption", where))
        if not image:
            raise DataError(f"{where}: empty image")
        if not caption:
            raise DataError(f"{where}: empty caption")
        split = _field(record, split_column, where).strip() if split_column else None
        if split is not None and split not in SPLIT_NAMES:
            raise DataError(f"{where}: split {split!r} is not one of {', '.join(SPLIT_NAMES)}")
        rows.append(Row(image, caption, split, where))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _split_by_ratio(n: int, ratios: Sequence[float], seed: int) -> list[str]:
    """Split name of each of n images: a seeded permutation cut into train, dev, test."""
    n_dev, n_test = (int(r * n + 0.5) for r in ratios[1:])
    n_train = n - n_dev - n_test
    if n_train < 1:
        raise DataError(f"--split-ratio leaves no training image out of {n}")
    order = np.random.default_rng(seed).permutation(n)
    names = np.empty(n, dtype=object)
    names[order[:n_train]] = "train"
    names[order[n_train : n_train + n_dev]] = "dev"
    names[order[n_train + n_dev :]] = "test"
    return list(names)


def import_manifest(manifest: str | os.PathLike, out: str | os.PathLike, *,
                    ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, split_column: str | None = None,
                    images: str | os.PathLike | None = None, force: bool = False) -> ManifestImport:
    """Group, split and write a manifest in the raw-image layout under `out` (see the module doc)."""
    rows = read_manifest(manifest, split_column)
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.image, []).append(row)
    report = ManifestImport(rows=len(rows))
    kept = {}
    for image, image_rows in groups.items():
        if len(image_rows) < CAPTIONS_PER_IMAGE:
            report.dropped += 1
            continue
        report.trimmed += len(image_rows) > CAPTIONS_PER_IMAGE
        if split_column:
            other = next((r for r in image_rows if r.split != image_rows[0].split), None)
            if other is not None:
                raise DataError(f"{other.where}: image {image} is in split {other.split!r} here and "
                                f"{image_rows[0].split!r} at {image_rows[0].where}; one split per image")
        kept[image] = image_rows[:CAPTIONS_PER_IMAGE]
    if not kept:
        raise DataError(f"{manifest}: no image has {CAPTIONS_PER_IMAGE} captions ({report.dropped} image(s) with "
                        f"fewer dropped); every image needs {CAPTIONS_PER_IMAGE} caption rows")
    by_id = all(image.isdigit() for image in kept)
    if by_id and images is not None:
        raise DataError(f"{manifest}: the image column holds ids, not files; --images needs file paths")
    names = ([r[0].split for r in kept.values()] if split_column
             else _split_by_ratio(len(kept), ratios, seed))
    splits: dict[str, list[Image]] = {}
    for number, ((image, image_rows), name) in enumerate(zip(kept.items(), names, strict=True)):
        image_id = int(image) if by_id else number
        splits.setdefault(name, []).append(Image(image_id, tuple(r.caption for r in image_rows),
                                                 "" if by_id else image))
    if "train" not in splits:
        raise DataError(f"{manifest}: no image in the train split")
    splits = {name: splits[name] for name in SPLIT_NAMES if name in splits}
    if images is not None:
        check_image_files(Path(images), [im.file for imgs in splits.values() for im in imgs])
    report.id_mapping = not by_id
    report.vocab_size = write_caption_layout(out, splits, with_mapping=not by_id, force=force)
    report.images = {name: len(imgs) for name, imgs in splits.items()}
    return report
