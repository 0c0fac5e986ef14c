"""Import Karpathy's split files (``dataset_flickr30k.json``, ``dataset_coco.json``, ``dataset_flickr8k.json``).

Each file lists ``images[]`` with ``filename`` (COCO also ``filepath``: train2014/val2014), ``split`` (train, val,
test, restval), ``sentences[]`` (``raw`` text and ``tokens``), ``imgid`` (index in the file) and, for COCO,
``cocoid``. The splits are written as the originals' precomp files define them (spec ``vsepp_and_scan.md`` 1.1):

* Flickr30K / Flickr8K: ``train`` (29,000 / 6,000), ``dev`` = val (1,014 / 1,000; the readers use only its first
  1,000 images, as the originals), ``test`` (1,000).
* COCO: ``train`` = train then restval (82,783 + 30,504 = 113,287), ``dev`` = val (5,000), ``testall`` = test (5,000;
  the 5-fold 1K and the 5K protocols) and ``test`` = the first 1,000 images of ``testall``.

Captions are the ``raw`` sentences (the originals' ``{split}_caps.txt`` hold raw text; their loaders lower-case and
tokenise), five per image in the file's order: images with more keep their first five (some COCO images have six
or seven), images with fewer are an error. Ids: COCO ``cocoid`` (VSE-infinity's COCO ``id_mapping.json`` is keyed
by the COCO image id); Flickr ``imgid`` (VSE-infinity's F30K ``id_mapping.json`` maps "0".."31013" to the files, in
the Karpathy file's order), or ``stem`` (the file name's integer stem, e.g. 1000092795) on request.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from itmatch.data.layout import CAPTIONS_PER_IMAGE, Image, check_image_files, clean_caption, write_caption_layout
from itmatch.errors import DataError

__all__ = ["KarpathyImport", "import_karpathy"]

IdField = Literal["auto", "imgid", "cocoid", "stem"]
COCO_TEST_IMAGES = 1000  # `test` = the first fold of `testall`
_KNOWN_SPLITS = ("train", "restval", "val", "test")


@dataclass
class KarpathyImport:
    """What `import_karpathy` wrote: dataset kind, images per split, images cut to five captions, vocabulary size."""

    dataset: str
    images: dict[str, int] = field(default_factory=dict)
    trimmed: int = 0
    vocab_size: int = 0
    id_mapping: bool = False


def _load(path: Path) -> tuple[list[Any], object]:
    try:
        payload = json.loads(path.read_bytes().decode("utf-8-sig"))
    except FileNotFoundError:
        raise DataError(f"Karpathy split file not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err}); pass a Karpathy dataset_*.json file") from None
    images = payload.get("images") if isinstance(payload, dict) else None
    if not isinstance(images, list) or not images:
        raise DataError(f"{path}: no 'images' list; expected a Karpathy dataset_*.json file")
    return images, payload.get("dataset", "")


def _kind(images: list[Any], declared: object) -> str:
    if declared in ("coco", "flickr30k", "flickr8k"):
        return str(declared)
    return "coco" if isinstance(images[0], dict) and "cocoid" in images[0] else "flickr"


def _image_id(item: dict[str, Any], id_field: str, where: str) -> int:
    if id_field == "stem":
        stem = Path(str(item.get("filename", ""))).stem
        if not stem.isdigit():
            raise DataError(f"{where}: file name stem {stem!r} is not an integer; use --id-field imgid")
        return int(stem)
    value = item.get(id_field)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where}: no integer '{id_field}'; pass --id-field with a field the file has")
    return value


def _captions(item: dict[str, Any], where: str) -> tuple[tuple[str, ...], bool]:
    """The first five raw sentences and whether the image had more."""
    sentences = item.get("sentences")
    if not isinstance(sentences, list):
        raise DataError(f"{where}: no 'sentences' list")
    if len(sentences) < CAPTIONS_PER_IMAGE:
        raise DataError(f"{where}: {len(sentences)} sentence(s); every image needs {CAPTIONS_PER_IMAGE}")
    captions = []
    for k, sentence in enumerate(sentences[:CAPTIONS_PER_IMAGE]):
        raw = sentence.get("raw") if isinstance(sentence, dict) else None
        text = clean_caption(raw) if isinstance(raw, str) else ""
        if not text:
            raise DataError(f"{where}: sentence {k} has no 'raw' text")
        captions.append(text)
    return tuple(captions), len(sentences) > CAPTIONS_PER_IMAGE


def import_karpathy(json_path: str | os.PathLike, out: str | os.PathLike, *, images: str | os.PathLike | None = None,
                    id_field: IdField = "auto", force: bool = False) -> KarpathyImport:
    """Write the splits of a Karpathy file in the raw-image/precomp caption layout under `out` (see module doc).

    `images` (the folder the file names are relative to) adds ``id_mapping.json`` after checking every file exists.
    """
    path = Path(json_path)
    items, declared = _load(path)
    kind = _kind(items, declared)
    coco = kind == "coco"
    if id_field == "auto":
        id_field = "cocoid" if coco else "imgid"
    groups: dict[str, list[Image]] = {name: [] for name in _KNOWN_SPLITS}
    report = KarpathyImport(dataset=kind)
    for n, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"{path}: images[{n}] is not an object")
        where = f"{path}: image {item.get('filename', f'#{n}')}"
        split = item.get("split")
        if split not in _KNOWN_SPLITS:
            raise DataError(f"{where}: split {split!r} is not one of {', '.join(_KNOWN_SPLITS)}")
        captions, trimmed = _captions(item, where)
        report.trimmed += trimmed
        filename = str(item.get("filename", ""))
        file = f"{item['filepath']}/{filename}" if coco and item.get("filepath") else filename
        groups[split].append(Image(_image_id(item, id_field, where), captions, file))
    splits = {"train": groups["train"] + groups["restval"], "dev": groups["val"]}
    if coco:
        splits |= {"test": groups["test"][:COCO_TEST_IMAGES], "testall": groups["test"]}
    else:
        splits["test"] = groups["test"]
    empty = [name for name, imgs in splits.items() if not imgs]
    if empty:
        raise DataError(f"{path}: no image in split {empty[0]} (Karpathy split names: train, restval, val, test)")
    if images is not None:
        check_image_files(Path(images), [im.file for imgs in splits.values() for im in imgs])
        report.id_mapping = True
    report.vocab_size = write_caption_layout(out, splits, with_mapping=images is not None, force=force)
    report.images = {name: len(imgs) for name, imgs in splits.items()}
    return report
