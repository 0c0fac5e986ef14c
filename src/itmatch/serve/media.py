"""Pictures of a served gallery: thumbnails, the id -> file mapping, the synthetic scenes, the region boxes.

Thumbnails: the gallery's own picture files when it has them (`id_mapping.json` or `IMAGE_DIR/ID.png|jpg`, the
image directory found as training finds it: the first of `IMAGE_DIR_NAMES` present), else the synthetic dataset's
scenes drawn from `scenes.jsonl` on first request (cached in a temporary directory). Callers pass only ids of the
gallery, and a resolved file must lie inside the image directory (no path traversal).
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from itmatch.data.layout import IMAGE_DIR_NAMES
from itmatch.errors import DataError
from itmatch.serve.limits import ServeError

_THUMB_SIDE = 384


def find_image_dir(root: Path) -> Path | None:
    """The dataset's image directory, found as training finds it (`IMAGE_DIR_NAMES` in order, under `root` or, in
    the VSE-infinity layout, the parent of precomp/), if any."""
    from itmatch.data.images import find_image_dir as training_image_dir

    try:
        return training_image_dir(root)
    except DataError:
        return None


def read_id_mapping(root: Path) -> dict[str, str]:
    """The dataset's id_mapping.json (image id -> file under the image directory), found where training finds it
    (next to the captions, or in the parent of precomp/); {} when there is none."""
    from itmatch.data.images import read_id_mapping as find_mapping

    return find_mapping(root, required=False)[0]


def read_scenes(root: Path, split: str) -> dict[str, list[dict]]:
    """The objects of each image of `split` in the synthetic dataset's `scenes.jsonl`, by image id ({} if none)."""
    from itmatch.data.synthetic import scene_records

    return {str(record["id"]): record["objects"] for record in scene_records(root, split)}


def open_boxes(root: Path, split: str, n_images: int) -> np.ndarray | None:
    """The (n_images, R, 4) region boxes of `split` (`{split}_boxes.npy` or GSMN's `_ims_bbx.npy`), memory-mapped."""
    for name in (f"{split}_boxes.npy", f"{split}_ims_bbx.npy"):
        if (root / name).is_file():
            boxes = np.load(root / name, mmap_mode="r", allow_pickle=False)
            if boxes.ndim == 3 and boxes.shape[0] == n_images and boxes.shape[2] == 4:
                return boxes
    return None


class Pictures:
    """Thumbnails of one dataset split's images, drawn or downscaled into `cache_dir` (a temporary directory when
    None, removed by `close`) on first request. Keys are image ids as strings."""

    def __init__(self, root: Path, split: str, *, cache_dir: str | os.PathLike | None = None) -> None:
        self.image_dir = find_image_dir(root)
        self._mapping = read_id_mapping(root)
        self._scenes = read_scenes(root, split)
        self._tmp = None if cache_dir else tempfile.TemporaryDirectory(prefix="itmatch-serve-")
        self.cache_dir = Path(cache_dir) if cache_dir else Path(self._tmp.name)  # type: ignore[union-attr]
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._render_lock = threading.Lock()

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    def available(self) -> bool:
        return self.image_dir is not None or bool(self._scenes)

    def thumbnail(self, key: str) -> Path:
        """A PNG file showing image `key` (drawn or downscaled into the cache on first request)."""
        cached = self.cache_dir / f"{key}.png"
        if cached.is_file():
            return cached
        source = self.picture_file(key)
        if source is None and key not in self._scenes:
            raise ServeError(404, f"image {key} has no picture: the dataset has neither an image directory "
                                  f"({'/'.join(IMAGE_DIR_NAMES)}) nor a scenes.jsonl entry for it")
        with self._render_lock:
            if not cached.is_file():
                tmp = cached.with_name(f".{key}.tmp.png")
                if source is not None:
                    from PIL import Image

                    try:
                        with Image.open(source) as im:
                            im.thumbnail((_THUMB_SIDE, _THUMB_SIDE))
                            im.convert("RGB").save(tmp, format="PNG")
                    except (OSError, Image.DecompressionBombError) as err:
                        raise ServeError(500, f"image {key}: {source.name} is not a readable picture ({err})") from None
                else:
                    from itmatch.data.synthetic import render_scene

                    render_scene(self._scenes[key], tmp)
                os.replace(tmp, cached)
        return cached

    def image_size(self, key: str) -> list[int] | None:
        """(width, height) in the pixels the boxes are given in: the picture file's, or the synthetic canvas."""
        source = self.picture_file(key)
        if source is not None:
            from PIL import Image

            with Image.open(source) as im:  # reads the header only
                return list(im.size)
        if key in self._scenes:
            from itmatch.data.synthetic import CANVAS_H, CANVAS_W

            return [CANVAS_W, CANVAS_H]
        return None

    def picture_file(self, key: str) -> Path | None:
        """The picture file of image `key` under the image directory; 403 when its mapping points outside it."""
        if self.image_dir is None:
            return None
        base = self.image_dir.resolve()
        names = [self._mapping[key]] if key in self._mapping else [f"{key}{ext}" for ext in (".png", ".jpg", ".jpeg")]
        for name in names:
            path = (base / name).resolve()
            if not path.is_relative_to(base):
                raise ServeError(403, f"image {key}: id_mapping.json points outside the image directory ({name!r})")
            if path.is_file():
                return path
        return None
