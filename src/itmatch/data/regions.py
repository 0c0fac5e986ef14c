"""Assemble per-image region features (PyTorch bottom-up-attention extractors) into a split's precomp arrays.

Inputs, one item per image in a folder:

* ``KEY.npz`` as the common PyTorch BUTD extractors write it: ``x`` (boxes, D) features, ``bbox`` (boxes, 4) pixel
  boxes x1, y1, x2, y2, ``num_bbox``, ``image_w``, ``image_h``;
* or ``KEY.npy`` (boxes, D) features with ``KEY_boxes.npy`` (boxes, 4) beside it (no image size, so no GSMN size
  file).

KEY is the image id, or the stem of the image's file in ``id_mapping.json`` (next to the id list or one folder up),
e.g. ``1000092795`` for F30K id 0. Rows follow the id list. Outputs: ``{split}_ims.npy`` (N, K, D) float32,
``{split}_ims_bbx.npy`` (N, K, 4) float32 pixel boxes and ``{split}_ims_size.npy`` (N, 2) float64 (width, height)
for GSMN, written through memory maps one image at a time. Fixed-count extracts (36 boxes) convert as they are;
with ``regions=K`` adaptive extracts (10-100 boxes) keep their first K boxes (the extractor's order, i.e. by
detection confidence) and shorter ones are padded with zero features and zero boxes.

Resuming: the arrays are filled under hidden ``.partial`` names and every `chunk` images a progress file records
how many rows are done (written atomically after the maps are flushed). Run the same command again after an
interruption and it reopens the maps and continues from there; the final names appear only when all rows are in.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from itmatch.data.butd import _read_id_list
from itmatch.data.layout import refuse_overwrite
from itmatch.errors import DataError
from itmatch.fileio import atomic_write

__all__ = ["RegionImport", "import_regions"]


@dataclass
class RegionImport:
    """What `import_regions` wrote: images, boxes per image K, feature size D, where it resumed, cut/padded counts."""

    images: int
    regions: int
    dim: int
    resumed_at: int = 0
    cut: int = 0
    padded: int = 0
    sizes: bool = True


@dataclass(frozen=True)
class _Item:
    features: np.ndarray  # (n, D)
    boxes: np.ndarray  # (n, 4)
    size: tuple[float, float] | None  # (width, height)


def _id_mapping(ids_path: Path) -> dict[str, str]:
    from itmatch.data.images import load_id_mapping

    for path in (ids_path.parent / "id_mapping.json", ids_path.parent.parent / "id_mapping.json"):
        if path.is_file():
            return load_id_mapping(path)
    return {}


def _find_files(features: Path, ids: list[int], mapping: dict[str, str]) -> list[Path]:
    """The feature file of every id: KEY.npz or KEY.npy for KEY = the id or its mapped file's stem."""
    found: list[Path] = []
    owner: dict[Path, int] = {}
    for image_id in ids:
        keys = [str(image_id)]
        if str(image_id) in mapping and Path(mapping[str(image_id)]).stem != keys[0]:
            keys.append(Path(mapping[str(image_id)]).stem)
        candidates = [features / f"{key}{ext}" for key in keys for ext in (".npz", ".npy")]
        present = [p for p in candidates if p.is_file()]
        if not present:
            raise DataError(f"image {image_id}: no feature file in {features} (looked for "
                            f"{', '.join(p.name for p in candidates)})")
        if len(present) > 1:
            raise DataError(f"image {image_id}: several feature files ({', '.join(p.name for p in present)}); "
                            "keep one per image")
        if present[0] in owner:
            raise DataError(f"images {owner[present[0]]} and {image_id} both resolve to {present[0]}; "
                            "each image needs its own feature file")
        owner[present[0]] = image_id
        if found and present[0].suffix != found[0].suffix:
            raise DataError(f"image {image_id}: {present[0].name} but earlier images have {found[0].suffix} files; "
                            "one format per split")
        found.append(present[0])
    return found


def _scalar(value: np.ndarray, name: str, where: str) -> float:
    if value.size != 1 or value.dtype.kind not in "iuf":
        raise DataError(f"{where}: '{name}' must be one number, got {value.dtype} {value.shape}")
    return float(value.reshape(()))


def _read(path: Path, image_id: int) -> _Item:
    """One image's features, boxes and size, validated; errors name the image and the file."""
    where = f"image {image_id} ({path})"
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in ("x", "bbox", "image_w", "image_h") if k not in z.files]
                if missing:
                    raise DataError(f"{where}: no '{missing[0]}' array (has {', '.join(z.files)})")
                features, boxes = z["x"], z["bbox"]
                count = _scalar(z["num_bbox"], "num_bbox", where) if "num_bbox" in z.files else len(features)
                size = (_scalar(z["image_w"], "image_w", where), _scalar(z["image_h"], "image_h", where))
            if count != len(features):
                raise DataError(f"{where}: num_bbox is {count:g} but 'x' has {len(features)} rows")
            if not (size[0] > 0 and size[1] > 0):
                raise DataError(f"{where}: image size {size[0]:g} x {size[1]:g} is not positive")
        else:
            box_path = path.with_name(f"{path.stem}_boxes.npy")
            if not box_path.is_file():
                raise DataError(f"{where}: no boxes file {box_path.name} beside it")
            features, boxes, size = np.load(path, allow_pickle=False), np.load(box_path, allow_pickle=False), None
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{where}: unreadable ({err})") from None
    if features.ndim != 2 or features.dtype.kind != "f" or len(features) == 0:
        raise DataError(f"{where}: features must be float (boxes, dim) with at least one box, "
                        f"got {features.dtype} {features.shape}")
    if boxes.shape != (len(features), 4) or boxes.dtype.kind not in "iuf":
        raise DataError(f"{where}: boxes must be ({len(features)}, 4) numbers, got {boxes.dtype} {boxes.shape}")
    if not (np.isfinite(features).all() and np.isfinite(boxes).all()):
        raise DataError(f"{where}: non-finite value (NaN/inf) in the features or boxes")
    return _Item(features, boxes, size)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def import_regions(features: str | os.PathLike, ids: str | os.PathLike, out: str | os.PathLike, split: str, *,
                   regions: int | None = None, force: bool = False, chunk: int = 256, progress: bool = False,
                   on_image: Callable[[int], None] | None = None) -> RegionImport:
    """Write `{split}_ims.npy`, `_ims_bbx.npy`, `_ims_size.npy` (and `_ids.txt`) in `out`, in the id list's order.

    `regions` = K cuts/pads every image to K boxes (see the module doc); without it every image must have the
    first image's box count. `on_image(row)` is called before each image is read (progress hooks, tests).
    """
    features, ids_path, out = Path(features), Path(ids), Path(out)
    if regions is not None and regions < 1:
        raise DataError(f"--regions must be at least 1, got {regions}")
    if not features.is_dir():
        raise DataError(f"feature folder not found: {features}")
    id_list = _read_id_list(ids_path)
    files = _find_files(features, id_list, _id_mapping(ids_path))
    n = len(id_list)
    with_sizes = all(p.suffix == ".npz" for p in files)
    names = ["ims", "ims_bbx"] + (["ims_size"] if with_sizes else [])
    final = {name: out / f"{split}_{name}.npy" for name in names}
    ids_out = out / f"{split}_ids.txt"
    ids_text = "".join(f"{image_id}\n" for image_id in id_list)
    same_ids = ids_out.is_file() and ids_out.read_text(encoding="utf-8").split() == ids_text.split()
    refuse_overwrite([*final.values(), *([] if same_ids else [ids_out])], force)
    out.mkdir(parents=True, exist_ok=True)

    first = _read(files[0], id_list[0])
    k, d = regions or len(first.features), first.features.shape[1]
    partial = {name: out / f".{path.name}.partial" for name, path in final.items()}
    progress_path = out / f".{split}_regions.progress.json"
    signature = {"ids": _digest(ids_path), "features": str(features.resolve()), "regions": k, "dim": d,
                 "sizes": with_sizes, "images": n}
    shapes = {"ims": ((n, k, d), np.float32), "ims_bbx": ((n, k, 4), np.float32), "ims_size": ((n, 2), np.float64)}
    done = 0
    try:
        state = json.loads(progress_path.read_text(encoding="utf-8")) if progress_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        state = {}
    if state.get("signature") == signature and all(p.is_file() for p in partial.values()):
        done = int(state.get("done", 0))
        arrays = {name: np.lib.format.open_memmap(partial[name], mode="r+") for name in names}
        if any(arrays[name].shape != shapes[name][0] for name in names):
            done = 0
    if done == 0:
        arrays = {name: np.lib.format.open_memmap(partial[name], mode="w+", dtype=shapes[name][1],
                                                  shape=shapes[name][0]) for name in names}
    result = RegionImport(images=n, regions=k, dim=d, resumed_at=done, sizes=with_sizes)
    result.cut, result.padded = int(state.get("cut", 0)) if done else 0, int(state.get("padded", 0)) if done else 0

    def save_progress(rows: int) -> None:
        for array in arrays.values():
            array.flush()
        payload = json.dumps({"signature": signature, "done": rows, "cut": result.cut, "padded": result.padded})
        atomic_write(progress_path, lambda fh: fh.write(payload.encode("utf-8")))

    for row in tqdm(range(done, n), desc=f"regions {split}", unit="img", disable=not progress):
        if on_image is not None:
            on_image(row)
        item = first if row == 0 else _read(files[row], id_list[row])
        count = len(item.features)
        if item.features.shape[1] != d:
            raise DataError(f"image {id_list[row]} ({files[row]}): feature size {item.features.shape[1]}, "
                            f"earlier images have {d}")
        if regions is None and count != k:
            raise DataError(f"image {id_list[row]} ({files[row]}) has {count} boxes but earlier images have {k}; "
                            "pass --regions K to cut or pad adaptive extracts to K boxes")
        keep = min(count, k)
        result.cut += count > k
        result.padded += count < k
        arrays["ims"][row, :keep] = item.features[:keep]
        arrays["ims"][row, keep:] = 0
        arrays["ims_bbx"][row, :keep] = item.boxes[:keep]
        arrays["ims_bbx"][row, keep:] = 0
        if with_sizes:
            assert item.size is not None
            arrays["ims_size"][row] = item.size
        if (row + 1) % chunk == 0:
            save_progress(row + 1)
    for array in arrays.values():
        array.flush()
    arrays.clear()  # drop the maps before renaming the files
    if not same_ids:
        atomic_write(ids_out, lambda fh: fh.write(ids_text.encode("utf-8")))
    for name in names:
        os.replace(partial[name], final[name])
    progress_path.unlink(missing_ok=True)
    return result
