"""The dataset layout: its constants (captions per image, names of the image directory), and the writer of imported
captions in the layout the readers expect (VSE-infinity's, which SCAN-layout tools also read).

``OUT/precomp/{split}_caps.txt`` (5 lines per image, in image order), ``OUT/precomp/{split}_ids.txt`` (one integer id
per image), ``OUT/precomp/vocab.json`` (count >= 4 over train+dev, as the originals) and, for raw images,
``OUT/id_mapping.json`` (``str(id)`` -> file relative to the image folder). Shared by the Karpathy and manifest
importers so that both write exactly the same files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from itmatch.data.vocab import VOCAB_THRESHOLD, build_vocab, save_vocab
from itmatch.errors import DataError
from itmatch.fileio import atomic_write

__all__ = ["CAPTIONS_PER_IMAGE", "IMAGE_DIR_NAMES", "Image", "check_image_files", "clean_caption", "refuse_overwrite",
           "write_caption_layout"]

CAPTIONS_PER_IMAGE = 5  # F30K and COCO: every image has 5 captions (the importers keep the first 5)
# The image directory of a raw-image dataset, in the order training and `itmatch serve` look for it.
IMAGE_DIR_NAMES = ("flickr30k-images", "images")  # upstream: data/f30k/flickr30k-images, data/coco/images



@dataclass(frozen=True)
class Image:
    """One image of a split: its integer id, its 5 captions and (raw-image layout) its file."""

    id: int
    captions: tuple[str, ...]
    file: str = ""


def clean_caption(text: str) -> str:
    """One line of text: surrounding whitespace dropped, inner runs (line breaks, tabs) turned into one space."""
    return " ".join(text.split())


def refuse_overwrite(paths: Iterable[Path], force: bool) -> None:
    """Raise unless `force` when one of `paths` already exists (no command replaces a user's file silently)."""
    if force:
        return
    existing = [p for p in paths if p.exists()]
    if existing:
        raise DataError(f"{existing[0]} exists ({len(existing)} output file(s) would be replaced); "
                        "pass --force to overwrite")


def check_image_files(images: Path, files: Sequence[str]) -> None:
    """Every mapped file must exist under the image folder; names the first missing one."""
    if not images.is_dir():
        raise DataError(f"image folder not found: {images}")
    missing = [f for f in files if not (images / f).is_file()]
    if missing:
        raise DataError(f"{images / missing[0]}: image not found ({len(missing)} of {len(files)} missing); "
                        "check --images")


def output_paths(out: Path, splits: Iterable[str], with_mapping: bool) -> list[Path]:
    root = out / "precomp"
    paths = [root / f"{s}_{kind}.txt" for s in splits for kind in ("caps", "ids")] + [root / "vocab.json"]
    return paths + ([out / "id_mapping.json"] if with_mapping else [])


def _write_text(path: Path, lines: Iterable[str]) -> None:
    data = "".join(f"{line}\n" for line in lines).encode("utf-8")
    atomic_write(path, lambda fh: fh.write(data))


def write_caption_layout(out: str | os.PathLike, splits: dict[str, Sequence[Image]], *, with_mapping: bool,
                         force: bool = False) -> int:
    """Write captions, ids, vocabulary (train+dev, threshold 4) and optionally id_mapping.json; returns the
    vocabulary size. Every file is written atomically; nothing is written when an output exists without `force`."""
    out = Path(out)
    refuse_overwrite(output_paths(out, splits, with_mapping), force)
    for name, images in splits.items():
        seen: set[int] = set()
        for image in images:
            if len(image.captions) != CAPTIONS_PER_IMAGE:  # the importers enforce this; a bug otherwise
                raise AssertionError(f"image {image.id} has {len(image.captions)} captions")
            if image.id in seen:
                raise DataError(f"image id {image.id} appears twice in split {name}; ids must be unique")
            seen.add(image.id)
    root = out / "precomp"
    for name, images in splits.items():
        _write_text(root / f"{name}_caps.txt", (c for image in images for c in image.captions))
        _write_text(root / f"{name}_ids.txt", (str(image.id) for image in images))
    vocab_captions = (c for name in ("train", "dev") for image in splits.get(name, ()) for c in image.captions)
    vocab = build_vocab(vocab_captions, threshold=VOCAB_THRESHOLD)
    save_vocab(vocab, root / "vocab.json")
    if with_mapping:
        mapping = {str(image.id): image.file for images in splits.values() for image in images}
        data = json.dumps(mapping, indent=0).encode("utf-8")
        atomic_write(out / "id_mapping.json", lambda fh: fh.write(data))
    return len(vocab)
