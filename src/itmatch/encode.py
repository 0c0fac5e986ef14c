"""Encode a folder of photos into image embeddings, resumably, for a retrieval index.

The images (found recursively, sorted by relative path) are cut into chunks; each chunk's embeddings are written
atomically to `OUT.parts/NNNNNN.npz` and a finished chunk is never recomputed, so an interrupted run continues
where it stopped. When every chunk is done they are joined into `OUT` (`.npz` with `embeddings` (N, D) float32,
`paths` (N,) relative to the folder, `skipped` (unreadable files, when asked to skip them)) and the parts are removed.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from itmatch.data.images import Normalisation, RawImages
from itmatch.errors import DataError
from itmatch.fileio import atomic_write
from itmatch.models.base import RetrievalModel

_logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def list_images(folder: str | os.PathLike) -> list[str]:
    """Image files under `folder` (recursive, by suffix), as sorted POSIX paths relative to it."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return found


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(path, lambda fh: fh.write(buffer.getvalue()))


@torch.inference_mode()
def encode_folder(model: RetrievalModel, folder: str | os.PathLike, out: str | os.PathLike, *, size: int,
                  normalisation: Normalisation, model_id: str = "", batch_size: int = 32, chunk: int = 1024,
                  workers: int = 0, skip_bad: bool = False, device: torch.device | str = "cpu",
                  progress: bool = False, on_chunk: Callable[[int], None] | None = None) -> dict:
    """Embed every image of `folder` with `model.encode_image` (eval transform at `size`) into `out`.

    `model_id` identifies the model in the parts' manifest: resuming with another model or another folder content
    is refused rather than mixing embeddings. Returns {"images", "skipped", "dim", "out"}.
    """
    root, out = Path(folder), Path(out)
    paths = list_images(root)
    parts = out.with_name(out.name + ".parts")
    manifest = {"model": model_id, "size": size, "normalisation": normalisation, "chunk": chunk, "paths": paths}
    manifest_path = parts / "manifest.json"
    if manifest_path.is_file():
        if json.loads(manifest_path.read_text(encoding="utf-8")) != manifest:
            raise DataError(f"{parts} holds an unfinished run with another model, settings or folder content; "
                            "remove it or choose another --out")
    else:
        text = json.dumps(manifest).encode("utf-8")
        atomic_write(manifest_path, lambda fh: fh.write(text))
    model.eval()
    n_chunks = -(-len(paths) // chunk)
    done = [k for k in range(n_chunks) if (parts / f"{k:06d}.npz").is_file()]
    bar = tqdm(total=len(paths), initial=sum(len(paths[k * chunk : (k + 1) * chunk]) for k in done),
               disable=not progress, unit="img", desc="encoding")
    for k in range(n_chunks):
        part = parts / f"{k:06d}.npz"
        if part.is_file():
            continue
        names = paths[k * chunk : (k + 1) * chunk]
        images = RawImages([root / n for n in names], size=size, normalisation=normalisation, threads=workers)
        embs, kept, skipped = [], [], []
        for start in range(0, len(names), batch_size):
            rows = list(range(start, min(start + batch_size, len(names))))
            if skip_bad:
                pixels = []
                for row in list(rows):
                    try:
                        pixels.append(images.load(row))
                    except DataError as err:
                        _logger.warning("skipping %s", err)
                        skipped.append(names[row])
                        rows.remove(row)
            else:
                pixels = list(images[np.asarray(rows)])  # decoded in `workers` threads
            if pixels:
                encoded = model.encode_image(torch.from_numpy(np.stack(pixels)).to(device)).emb
                embs.append(encoded.float().cpu().numpy())
                kept += [names[r] for r in rows]
            bar.update(min(batch_size, len(names) - start))
        dim = embs[0].shape[1] if embs else 0
        _save_npz(part, embeddings=np.concatenate(embs) if embs else np.zeros((0, dim), np.float32),
                  paths=np.array(kept, dtype=str), skipped=np.array(skipped, dtype=str))
        if on_chunk is not None:
            on_chunk(k)
    bar.close()
    loaded = [np.load(parts / f"{k:06d}.npz") for k in range(n_chunks)]
    dims = {z["embeddings"].shape[1] for z in loaded if len(z["embeddings"])}
    if len(dims) > 1:
        raise DataError(f"{parts}: chunks of different embedding sizes {sorted(dims)}; remove it and start again")
    dim = dims.pop() if dims else 0
    embeddings = np.concatenate([z["embeddings"].reshape(-1, dim) for z in loaded]).astype(np.float32)
    kept_paths = np.concatenate([z["paths"] for z in loaded]).astype(str)
    skipped_paths = np.concatenate([z["skipped"] for z in loaded]).astype(str)
    _save_npz(out, embeddings=embeddings, paths=kept_paths, skipped=skipped_paths)
    shutil.rmtree(parts)
    return {"images": len(kept_paths), "skipped": len(skipped_paths), "dim": dim, "out": str(out)}
