"""What the server accepts: the limits of a request (`ServeLimits`), the refusal every check raises (`ServeError`,
whose `status` is the HTTP answer and whose message is one line), the checks of queries and uploaded region
features, and the concurrency gate (`Gate`: at most `max_running` searches at once, `max_waiting` queued, then 503).

Uploads are region features, not picture files: the indexed models read detector features (`{split}_ims.npy` rows),
so an "image" query is an (R, D) array saved with `numpy.save`. Picture files are refused with 415 and a message
saying so.
"""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from itmatch.errors import ItmatchError

_PICTURE_MAGIC = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"RIFF": "WebP", b"BM": "BMP"}
_NPY_MAGIC = b"\x93NUMPY"


class ServeError(ItmatchError):
    """A request the service refuses; `status` is the HTTP status it answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class ServeLimits:
    max_query_chars: int = 500
    max_k: int = 100
    max_upload_bytes: int = 4 << 20  # an (R, D) float32 upload: 36 x 2048 x 4 = 288 KiB for BUTD features
    max_regions: int = 1024
    max_running: int = 4  # searches computing at once (FAISS and torch are CPU bound)
    max_waiting: int = 64  # searches queued behind them before the server answers 503


def check_text(text: str, limits: ServeLimits) -> str:
    """A typed query with its whitespace collapsed; 422 when empty or longer than the limit."""
    text = re.sub(r"\s+", " ", text).strip()
    if not text:
        raise ServeError(422, "empty query: type a sentence")
    if len(text) > limits.max_query_chars:
        raise ServeError(422, f"query is {len(text)} characters; the limit is {limits.max_query_chars}")
    return text


def check_k(k: int, limits: ServeLimits) -> int:
    if not 1 <= k <= limits.max_k:
        raise ServeError(422, f"k must be between 1 and {limits.max_k}, got {k}")
    return k


def read_upload(body: bytes, limits: ServeLimits) -> np.ndarray:
    """The array of an uploaded `.npy` body: refused when too large, empty, a picture file or not a `.npy`."""
    if len(body) > limits.max_upload_bytes:
        raise ServeError(413, f"upload is {len(body)} bytes; the limit is {limits.max_upload_bytes}")
    if not body:
        raise ServeError(400, "empty upload: send one image's region features as a .npy file")
    for magic, kind in _PICTURE_MAGIC.items():
        if body.startswith(magic):
            raise ServeError(415, f"a {kind} picture was uploaded, but this gallery's model reads region "
                                  "features: upload a .npy of shape (regions, dim) (numpy.save)")
    if not body.startswith(_NPY_MAGIC):
        raise ServeError(415, "not a .npy file: upload one image's region features saved with numpy.save")
    try:
        return np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ServeError(400, f"unreadable .npy upload ({str(err).splitlines()[0][:160]})") from None


def check_features(feats: np.ndarray, shape: Sequence[int | None], limits: ServeLimits) -> np.ndarray:
    """Uploaded features as float32, checked against the `shape` the index's model reads ((regions, dim) or
    (dim,); only the last axis is fixed) and the region limit; 422 otherwise."""
    dim = shape[-1]
    if feats.dtype.kind not in "fiu":
        raise ServeError(422, f"features must be numbers, got dtype {feats.dtype}")
    if feats.ndim != len(shape) or feats.shape[-1] != dim:
        want = f"(regions, {dim})" if len(shape) == 2 else f"({dim},)"
        raise ServeError(422, f"features have shape {feats.shape}; this index's model reads {want}")
    if feats.ndim == 2 and not 1 <= feats.shape[0] <= limits.max_regions:
        raise ServeError(422, f"{feats.shape[0]} regions; between 1 and {limits.max_regions} are accepted")
    feats = feats.astype(np.float32)
    if not np.isfinite(feats).all():
        raise ServeError(422, "features contain NaN or infinity")
    return feats


class Gate:
    """At most `running` calls at once in worker threads, `waiting` more queued; beyond that 503."""

    def __init__(self, running: int, waiting: int) -> None:
        self.running, self.waiting = running, waiting
        self._sem: asyncio.Semaphore | None = None
        self.pending = 0

    async def run(self, fn: Any, *args: Any) -> Any:
        from starlette.concurrency import run_in_threadpool

        if self._sem is None:
            self._sem = asyncio.Semaphore(self.running)
        if self.pending >= self.running + self.waiting:
            raise ServeError(503, f"server busy: {self.pending} searches running or queued; retry shortly")
        self.pending += 1
        try:
            async with self._sem:
                return await run_in_threadpool(fn, *args)
        finally:
            self.pending -= 1
