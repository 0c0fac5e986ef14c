"""Convert bottom-up-attention (BUTD) TSV region features into the precomp ``.npy`` layout.

The TSV files written by bottom-up-attention's ``generate_tsv.py`` hold one image per line: id, width, height,
box count, and base64-encoded float32 boxes and features. The reference converter kept every image in a dict
and stacked them at the end (tens of GB of RAM for COCO); here rows are written straight into memory-mapped
``.npy`` files in the order of the image-id list, under temporary names that are renamed only on success.
"""

from __future__ import annotations

import base64
import binascii
import csv
import os
import sys
from collections import Counter
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from itmatch.errors import DataError

__all__ = ["FIELDNAMES", "convert_butd"]

PathLike = str | os.PathLike[str]

FIELDNAMES = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")


def _read_id_list(path: Path) -> list[int]:
    """Integer image ids, one per line (blank lines ignored); rejects empty lists and duplicates."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"image id list not found: {path}; pass a text file with one id per line") from None
    ids: list[int] = []
    for line_no, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        try:
            ids.append(int(text))
        except ValueError:
            raise DataError(f"{path}:{line_no}: {text!r} is not an integer image id; fix the line") from None
    if not ids:
        raise DataError(f"image id list {path} is empty; it must list the split's image ids, one per line")
    duplicates = [image_id for image_id, count in Counter(ids).items() if count > 1]
    if duplicates:
        raise DataError(
            f"image id list {path} repeats {len(duplicates)} id(s), e.g. {duplicates[:5]}; list images once"
        )
    return ids


def _records(paths: Sequence[Path]) -> Generator[tuple[str, dict[Any, Any]], None, None]:
    """Yield ``("file:line", record)`` for every TSV line of every file, in order."""
    for path in paths:
        try:
            handle = path.open("r", encoding="utf-8", newline="")
        except FileNotFoundError:
            raise DataError(f"BUTD feature file not found: {path}; check the --tsv path(s)") from None
        with handle:
            reader = csv.DictReader(handle, fieldnames=FIELDNAMES, delimiter="\t")
            try:
                for record in reader:
                    yield f"{path}:{reader.line_num}", record
            except UnicodeDecodeError:
                raise DataError(f"{path}:{reader.line_num + 1}: not UTF-8 text; a BUTD TSV has one image per line: "
                                "image_id, image_w, image_h, num_boxes, then base64 boxes and features") from None


def _row_for(record: dict[Any, Any], where: str, row_of: dict[int, int]) -> int | None:
    """Output row of a record's image, or None when the image is not in the id list."""
    if None in record or any(record.get(name) is None for name in FIELDNAMES):
        raise DataError(f"{where}: expected {len(FIELDNAMES)} tab-separated fields; regenerate the TSV")
    try:
        image_id = int(record["image_id"])
    except ValueError:
        raise DataError(f"{where}: image_id {record['image_id']!r} is not an integer; fix the TSV") from None
    return row_of.get(image_id)


def _decode(record: dict[Any, Any], field: str, where: str, image_id: int) -> np.ndarray:
    """Decode one base64 float32 field of a record."""
    try:
        raw = base64.b64decode(record[field], validate=True)
        return np.frombuffer(raw, dtype=np.float32)
    except (binascii.Error, ValueError) as exc:
        raise DataError(
            f"{where}: image {image_id}: field '{field}' is not base64 float32 data ({exc}); fix the TSV"
        ) from None


def _open_outputs(temp: dict[str, Path], n: int, k: int, d: int) -> dict[str, np.memmap]:
    """Create the memory-mapped outputs: ims (N, K, D) and boxes (N, K, 4) float32, sizes (N, 2) int64."""
    specs = {"ims": ((n, k, d), np.float32), "boxes": ((n, k, 4), np.float32), "sizes": ((n, 2), np.int64)}
    return {
        key: np.lib.format.open_memmap(temp[key], mode="w+", dtype=dtype, shape=shape)
        for key, (shape, dtype) in specs.items()
    }


def _raise_field_limit() -> int:
    """Allow arbitrarily long CSV fields (features are ~300 KB of base64); returns the previous limit."""
    limit = sys.maxsize
    while True:
        try:
            return csv.field_size_limit(limit)
        except OverflowError:  # C long is 32 bits on some platforms
            limit //= 2


def convert_butd(
    tsv: PathLike | Sequence[PathLike],
    imgid_list: PathLike,
    out_dir: PathLike,
    split: str,
    *,
    progress: bool = False,
) -> int:
    """Write ``{split}_ims.npy``, ``_boxes.npy``, ``_sizes.npy`` and ``_ids.txt`` from BUTD TSV file(s).

    Rows follow the order of ``imgid_list``; TSV records of other images are skipped. Every listed image must
    have the same box count K (the precomp layout is a dense (N, K, D) array). Returns the number of images.
    """
    paths = [Path(tsv)] if isinstance(tsv, str | os.PathLike) else [Path(p) for p in tsv]
    if not paths:
        raise DataError("no BUTD TSV file given; pass at least one feature file")
    id_path = Path(imgid_list)
    ids = _read_id_list(id_path)
    row_of = {image_id: row for row, image_id in enumerate(ids)}
    n = len(ids)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    final = {
        "ims": out / f"{split}_ims.npy",
        "boxes": out / f"{split}_boxes.npy",
        "sizes": out / f"{split}_sizes.npy",
        "ids": out / f"{split}_ids.txt",
    }
    temp = {key: path.with_name(f".{path.name}.{os.getpid()}.tmp") for key, path in final.items()}
    arrays: dict[str, np.memmap] = {}  # ims, boxes, sizes: created when the first listed image arrives
    filled = np.zeros(n, dtype=bool)
    k = d = 0
    old_limit = _raise_field_limit()
    records = _records(paths)
    try:
        with tqdm(records, desc=f"butd {split}", unit="rec", disable=not progress) as bar:
            for where, record in bar:
                row = _row_for(record, where, row_of)
                if row is None:
                    continue
                image_id = ids[row]
                try:
                    width, height, num_boxes = (int(record[f]) for f in ("image_w", "image_h", "num_boxes"))
                except ValueError:
                    raise DataError(
                        f"{where}: image {image_id}: image_w/image_h/num_boxes must be integers"
                    ) from None
                boxes = _decode(record, "boxes", where, image_id)
                features = _decode(record, "features", where, image_id)
                if not arrays:
                    if num_boxes <= 0 or features.size == 0 or features.size % num_boxes:
                        raise DataError(
                            f"{where}: image {image_id}: {features.size} feature values do not split into "
                            f"{num_boxes} boxes; regenerate the TSV"
                        )
                    k, d = num_boxes, features.size // num_boxes
                    arrays.update(_open_outputs(temp, n, k, d))
                if num_boxes != k:
                    raise DataError(
                        f"{where}: image {image_id} has {num_boxes} boxes but earlier images have {k}; the "
                        "precomp layout needs a fixed box count (extract a fixed number of boxes per image)"
                    )
                if boxes.size != k * 4 or features.size != k * d:
                    raise DataError(
                        f"{where}: image {image_id}: expected {k}x4 box and {k}x{d} feature values, found "
                        f"{boxes.size} and {features.size}; regenerate the TSV"
                    )
                # An image listed twice in the TSV(s) keeps its last record, as in the original converter.
                arrays["ims"][row] = features.reshape(k, d)
                arrays["boxes"][row] = boxes.reshape(k, 4)
                arrays["sizes"][row] = (width, height)
                filled[row] = True
        if not filled.all():
            missing = [ids[i] for i in np.flatnonzero(~filled)[:5]]
            raise DataError(
                f"{int((~filled).sum())} of {n} image id(s) in {id_path} are not in the TSV file(s), e.g. "
                f"{missing}; pass all TSV shards or fix the id list"
            )
        for array in arrays.values():
            array.flush()
        arrays.clear()  # drop the maps before renaming the files
        temp["ids"].write_text("".join(f"{image_id}\n" for image_id in ids), encoding="utf-8")
        for key, path in final.items():
            os.replace(temp[key], path)
    finally:
        records.close()
        csv.field_size_limit(old_limit)
        arrays.clear()
        for path in temp.values():
            path.unlink(missing_ok=True)
    return n
