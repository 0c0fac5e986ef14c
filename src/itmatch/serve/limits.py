"""What the server accepts: the limits of a request (`ServeLimits`), the refusal every check raises (`ServeError`,
whose `status` is the HTTP answer and whose message is one line), the checks of queries and uploaded region
features, and the concurrency gate (`Gate`: at most `max_running` searches at once, `max_waiting` queued, then 503).

Uploads are region features, not picture files: the indexed models read detector features (`{split}_ims.npy` rows),
so an "image" query is an (R, D) array saved with `numpy.save`. Picture files are refused with 415 and a message
saying so. An upload's `.npy` header is read first: a declared shape larger than the limits is refused before any
data is allocated, and the features themselves are checked by `itmatch.validate`, as the CLI and `Searcher` do.
"""

from __future__ import annotations

import asyncio
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from itmatch import validate
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
    header_timeout_s: float = 10.0  # a request head (request line + headers) must arrive within this, else 408
    body_timeout_s: float = 30.0  # an upload must arrive within this, else 408
    max_incomplete_per_client: int = 16  # connections of one address still sending their head; beyond: oldest closed
    max_incomplete: int = 128  # the same, over all addresses

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ItmatchError(f"serve limit {field.name} must be a positive number, got {value!r}")


def check_text(text: str, limits: ServeLimits) -> str:
    """A typed query with its whitespace collapsed (`itmatch.validate.check_text` under the server's limit)."""
    return validate.check_text(text, limits.max_query_chars)


def check_k(k: int, limits: ServeLimits) -> int:
    return validate.check_k(k, limits.max_k)


def read_npy_header(body: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of a `.npy` body, read from its header alone (nothing allocated
    for the data); 400 when the header is unreadable, 415 for an unknown format version."""
    fp = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version in ((2, 0), (3, 0)):  # 3.0 differs from 2.0 only by UTF-8 field names, which are refused
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ServeError(415, f".npy format version {version[0]}.{version[1]} is not accepted; save one image's "
                                  "region features with numpy.save (versions 1.0 to 3.0)")
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise ServeError(400, f"unreadable .npy upload ({first})") from None
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise ServeError(400, f"unreadable .npy upload (its header declares the shape {tuple(shape)!r})")
    return tuple(shape), bool(fortran), dtype, fp.tell()


def read_upload(body: bytes, limits: ServeLimits, expected: Sequence[int | None]) -> np.ndarray:
    """The features of an uploaded `.npy` body, as float32, checked against `expected` (one image's shape as the
    index's model reads it). Refused when too large (413; for a header declaring more data than the limit too, before
    anything is allocated), empty (400), a picture file or not a `.npy` (415), unreadable or truncated (400), or
    when `itmatch.validate` refuses the features (422)."""
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
    shape, fortran, dtype, offset = read_npy_header(body)
    count = math.prod(shape)
    declared = count * dtype.itemsize
    if declared > limits.max_upload_bytes:
        raise ServeError(413, f"the .npy header declares shape {shape} of {dtype} ({declared} bytes); the limit is "
                              f"{limits.max_upload_bytes} bytes")
    validate.check_feature_shape(shape, dtype, expected, max_regions=limits.max_regions)
    if len(body) - offset != declared:
        raise ServeError(400, f"unreadable .npy upload (truncated or padded: its header declares shape {shape} of "
                              f"{dtype}, {declared} bytes of data, but {len(body) - offset} follow)")
    array = np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(shape, order="F" if fortran else "C")
    return validate.check_features(array, expected, max_regions=limits.max_regions)


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
