"""Raw-image datasets in VSE-infinity's layout, with its transforms, decoded by Pillow and numpy.

Upstream: github.com/woodfrog/vse_infty @ 29df9d6, `lib/datasets/image_caption.py:RawImageDataset`. Layout::

    DATA/precomp/{split}_caps.txt   5 captions per image (or DATA/{split}_caps.txt, as the synthetic dataset)
    DATA/precomp/{split}_ids.txt    one id per image (or per caption); caption k's image is ids[k // im_div]
    DATA/id_mapping.json            str(id) -> image file, relative to the image directory
    DATA/flickr30k-images/ or DATA/images/   the image directory (F30K / COCO; `data.image_dir` overrides)

Transforms (upstream `_process_image`): target size S = int(256 * input_scale_factor), square, aspect not kept.
Training: crop ratio r = 0.6 + 0.4 U[0,1), an int(h r) x int(w r) crop at a uniform random offset, bilinear
resize to S x S (half-pixel centres, as `cv2.resize`; the result is rounded to 8 bits like cv2's uint8 output),
horizontal flip with probability 1/2. Evaluation: the whole image resized to S x S. Normalisation: the detector
backbone reads BGR and subtracts the Caffe means (0..255 range); the others divide by 255 and standardise with
the ImageNet mean/std (RGB). Output (3, S, S) float32.

Unreadable images raise a `DataError` naming the file; `skip_bad=True` drops the pair from a training batch
instead (logged once per file). Evaluation never skips: it would misalign the 5 captions of each image.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from itmatch.data.layout import CAPTIONS_PER_IMAGE, IMAGE_DIR_NAMES
from itmatch.data.precomp import DEV_CAPTIONS, read_captions
from itmatch.errors import DataError

_logger = logging.getLogger(__name__)

Normalisation = Literal["imagenet", "detector"]
BGR_MEANS = np.array([102.9801, 115.9465, 122.7717], dtype=np.float32)  # Caffe BUTD detector, BGR order
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class Rng(Protocol):
    """What the transforms draw from (a `numpy.random.Generator`)."""

    def random(self) -> float: ...

    def integers(self, high: int) -> int: ...


def image_size(input_scale_factor: float) -> int:
    """Upstream's side length: int(256 * input_scale_factor) (released models: 2.0 -> 512)."""
    size = int(256 * input_scale_factor)
    if size < 1:
        raise DataError(f"input_scale_factor {input_scale_factor} gives an empty image")
    return size


def decode(path: Path, *, bgr: bool = False) -> np.ndarray:
    """(H, W, 3) uint8 RGB (BGR if asked) with Pillow; grey and palette images become 3 channels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{path}: image not found") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from None
    return array[:, :, ::-1] if bgr else array


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) -> (height, width, C) float32 bilinear with half-pixel centres and edge clamping (cv2's
    INTER_LINEAR, no antialiasing): output pixel d samples input coordinate (d + 0.5) * in / out - 0.5."""

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (src - lo).astype(np.float32)

    y0, y1, fy = axis(image.shape[0], height)
    x0, x1, fx = axis(image.shape[1], width)
    img = image.astype(np.float32)
    rows = img[y0] * (1 - fy)[:, None, None] + img[y1] * fy[:, None, None]  # (height, W, C)
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


def crop_box(height: int, width: int, rng: Rng) -> tuple[int, int, int, int]:
    """Upstream's random crop (top, left, crop height, crop width): ratio 0.6 + 0.4 U, offsets uniform."""
    ratio = rng.random() * 0.4 + 0.6
    ch, cw = int(height * ratio), int(width * ratio)
    left = int(rng.integers(width - cw)) if width > cw else 0
    top = int(rng.integers(height - ch)) if height > ch else 0
    return top, left, ch, cw


def normalise(image: np.ndarray, normalisation: Normalisation) -> np.ndarray:
    """(S, S, 3) 0..255 float -> (3, S, S) float32, detector (BGR minus means) or ImageNet mean/std."""
    if normalisation == "detector":
        out = image - BGR_MEANS
    else:
        out = (image / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32)


def transform(image: np.ndarray, size: int, normalisation: Normalisation, rng: Rng | None = None) -> np.ndarray:
    """Upstream `_process_image` on a decoded (H, W, 3) uint8 image: train (with `rng`) or eval transform."""
    if rng is not None:
        top, left, ch, cw = crop_box(image.shape[0], image.shape[1], rng)
        image = image[top : top + ch, left : left + cw]
    out = np.clip(np.rint(resize_bilinear(image, size, size)), 0, 255)  # cv2 returns uint8
    if rng is not None and rng.random() > 0.5:
        out = out[:, ::-1]
    return normalise(out, normalisation)


def find_image_dir(root: Path, explicit: str = "") -> Path:
    """The directory id_mapping.json paths are relative to: `explicit`, or DATA/flickr30k-images, DATA/images."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise DataError(f"image directory not found: {path}")
        return path
    bases = [root, root.parent] if root.name == "precomp" else [root]
    candidates = [b / name for b in bases for name in IMAGE_DIR_NAMES]
    for path in candidates:
        if path.is_dir():
            return path
    raise DataError(f"no image directory for {root} (looked for {', '.join(map(str, candidates))}); "
                    "pass --set data.image_dir=DIR")


def load_id_mapping(path: Path) -> dict[str, str]:
    """An id_mapping.json file: image id (as text) -> file name, or one line saying what is wrong with it."""
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(mapping, dict):
        raise DataError(f"{path}: expected an object mapping image ids to file names")
    return {str(k): str(v) for k, v in mapping.items()}


def read_id_mapping(root: Path, *, required: bool = True) -> tuple[dict[str, str], Path | None]:
    """id_mapping.json next to the captions or, in the VSE-infinity layout, in the parent of precomp/ ((empty, None)
    when there is none and it is not `required`)."""
    candidates = [root / "id_mapping.json"] + ([root.parent / "id_mapping.json"] if root.name == "precomp" else [])
    for path in candidates:
        if path.is_file():
            return load_id_mapping(path), path
    if not required:
        return {}, None
    raise DataError(f"no id_mapping.json in {' or '.join(str(c.parent) for c in candidates)}; raw-image datasets "
                    "map the ids of {split}_ids.txt to files through it")


class RawImages:
    """Decoded, transformed images by row: `images[rows]` -> (len(rows), 3, S, S) float32 (eval transform).

    `threads` > 1 decodes a batch in a thread pool (Pillow and numpy release the GIL for most of the work).
    """

    ndim = 4
    dtype = np.dtype(np.float32)

    def __init__(self, paths: list[Path], *, size: int, normalisation: Normalisation, threads: int = 0,
                 skip_bad: bool = False) -> None:
        self.paths, self.size, self.normalisation = paths, size, normalisation
        self.threads, self.skip_bad = threads, skip_bad
        self.path = paths[0].parent if paths else Path()
        self._reported: set[Path] = set()

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), 3, self.size, self.size)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, row: int, rng: Rng | None = None) -> np.ndarray:
        """One image, (3, S, S); with `rng`, the training transform."""
        path = self.paths[row]
        return transform(decode(path, bgr=self.normalisation == "detector"), self.size, self.normalisation, rng)

    def _map(self, fn, items: list) -> list:
        if self.threads > 1 and len(items) > 1:
            with ThreadPoolExecutor(self.threads) as pool:
                return list(pool.map(fn, items))
        return [fn(item) for item in items]

    def __getitem__(self, rows: int | np.ndarray | list[int]) -> np.ndarray:
        if isinstance(rows, int | np.integer):
            return self.load(int(rows))
        return np.stack(self._map(self.load, [int(r) for r in np.asarray(rows).reshape(-1)]))

    def training(self, rows: list[int], rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
        """Training transforms of `rows` -> (images, positions kept); unreadable images are dropped only when
        `skip_bad` (else their `DataError` propagates). Random draws are made in row order, before decoding."""
        seeds = rng.integers(2**63, size=len(rows))

        def one(i: int) -> np.ndarray | None:
            try:
                return self.load(rows[i], np.random.default_rng(int(seeds[i])))
            except DataError as err:
                if not self.skip_bad:
                    raise
                if self.paths[rows[i]] not in self._reported:
                    self._reported.add(self.paths[rows[i]])
                    _logger.warning("skipping %s", err)
                return None

        out = self._map(one, list(range(len(rows))))
        kept = [i for i, im in enumerate(out) if im is not None]
        if not kept:
            raise DataError(f"every image of a training batch is unreadable (first: {self.paths[rows[0]]})")
        return np.stack([out[i] for i in kept]), kept

    def release(self) -> None:
        """Nothing to unmap (interface of `MappedArray`)."""


class ImageSplit:
    """One split of a raw-image dataset, with the attributes of `PrecompSplit` (captions, ids, image_of, ...)."""

    def __init__(self, root: str | os.PathLike, split: str, *, input_scale_factor: float = 1.0,
                 normalisation: Normalisation = "imagenet", image_dir: str = "", workers: int = 0,
                 skip_bad: bool = False, truncate_dev: bool = True, max_images: int = 0) -> None:
        self.root, self.split = Path(root), split
        self.captions = read_captions(self.root / f"{split}_caps.txt")
        ids_path = self.root / f"{split}_ids.txt"
        if not ids_path.is_file():
            raise DataError(f"missing file: {ids_path} (raw-image datasets find each image through its id)")
        try:
            self.ids: list[int] | None = [int(x) for x in ids_path.read_text(encoding="utf-8").split()]
        except ValueError:
            raise DataError(f"{ids_path}: expected one integer id per line") from None
        ids = self.ids or []
        n_img, n_cap = len(ids), len(self.captions)
        self.im_div = 1 if n_img == n_cap else CAPTIONS_PER_IMAGE  # upstream's rule, as for features
        if n_img == 0 or (self.im_div == CAPTIONS_PER_IMAGE and n_cap != CAPTIONS_PER_IMAGE * n_img):
            raise DataError(f"{ids_path}: {n_img} ids for {n_cap} captions; expected one id per image (5 captions "
                            "each) or one per caption")
        for k, caption in enumerate(self.captions):
            if not caption:
                raise DataError(f"{self.root / f'{split}_caps.txt'}:{k + 1}: empty caption; every line needs text")
        if truncate_dev and split == "dev":
            self.captions = self.captions[:DEV_CAPTIONS]
        if max_images > 0:
            self.captions = self.captions[: max_images * CAPTIONS_PER_IMAGE]
        mapping, mapping_path = read_id_mapping(self.root)
        base = find_image_dir(self.root, image_dir)
        missing = [i for i in ids if str(i) not in mapping]
        if missing:
            raise DataError(f"{mapping_path}: no entry for image id {missing[0]} of {ids_path} "
                            f"({len(missing)} ids missing)")
        self.images = RawImages([base / mapping[str(i)] for i in ids], size=image_size(input_scale_factor),
                                normalisation=normalisation, threads=workers, skip_bad=skip_bad)

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    @property
    def n_images(self) -> int:
        return -(-self.n_captions // CAPTIONS_PER_IMAGE) if self.im_div == CAPTIONS_PER_IMAGE else self.n_captions

    def image_of(self, caption_index: int) -> int:
        return caption_index // self.im_div

    def training_images(self, rows: list[int], rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
        """Training-transformed images of `rows` and the positions kept (all unless `skip_bad` dropped some)."""
        return self.images.training(rows, rng)
