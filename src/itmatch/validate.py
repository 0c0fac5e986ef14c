"""The checks of a search query, in one place: the CLI (`itmatch search`), the Python API (`Searcher.search_text`,
`Searcher.search_image`) and the server (`itmatch serve`) call these, so one bad input gets the same one-line
`QueryError` everywhere (the CLI prints it as `itmatch: error: ...`, exit 2; the server answers 422 with it as the
JSON `detail`).

- `check_text`: a string, not empty once its whitespace is collapsed, no control characters or unpaired
  surrogates, at most `max_chars` characters; returns the collapsed text.
- `check_k`: an integer between 1 and `max_k`.
- `check_feature_shape` / `check_features`: real numbers (integer or float dtypes; complex, bool, object, strings,
  structured refused), the index's shape (only the last axis, the feature size, is fixed), at least one region and
  at most `max_regions`, every value finite. `check_feature_shape` needs only a shape and a dtype, so an upload is
  refused from its `.npy` header before its data is read.
- `check_boxes`: (regions, 4) real, finite boxes matching the features' regions.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np

from itmatch.errors import QueryError

_REAL_KINDS = "fiu"  # float, signed and unsigned integers; not b (bool), c (complex), O, U, S, V, M, m
_SPACE = re.compile(r"\s+")


def check_text(text: Any, max_chars: int | None = None) -> str:
    """`text` with its whitespace collapsed to single spaces and stripped; refused when it is not a string, is empty
    or whitespace only, holds control characters or unpaired surrogates, or is longer than `max_chars`."""
    if not isinstance(text, str):
        raise QueryError(f"a text query must be a string, got {type(text).__name__}")
    text = _SPACE.sub(" ", text).strip()
    if not text:
        raise QueryError("empty query: type a sentence")
    if max_chars is not None and len(text) > max_chars:
        raise QueryError(f"query is {len(text)} characters; the limit is {max_chars}")
    bad = next((c for c in text if unicodedata.category(c) in ("Cc", "Cs")), None)
    if bad is not None:
        what = "an unpaired surrogate (not UTF-8 text)" if unicodedata.category(bad) == "Cs" else "a control character"
        raise QueryError(f"query holds {what} {bad!r}; type plain text")
    return text


def check_k(k: Any, max_k: int | None = None) -> int:
    """`k` as an int, refused unless it is an integer in 1..max_k (no upper bound when `max_k` is None)."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise QueryError(f"k must be an integer, got {k!r}")
    k = int(k)
    if k < 1 or (max_k is not None and k > max_k):
        upper = max_k if max_k is not None else "the gallery size"
        raise QueryError(f"k must be between 1 and {upper}, got {k}")
    return k


def _want(shape: Sequence[int | None]) -> str:
    return f"(regions, {shape[-1]})" if len(shape) == 2 else f"({shape[-1]},)"


def check_feature_shape(shape: Sequence[int], dtype: np.dtype, expected: Sequence[int | None], *,
                        max_regions: int | None = None, batch: bool = False) -> None:
    """Refuse features of a non-real dtype or a shape other than `expected` (the shape of one image as the index's
    model reads it: (regions, dim) or (dim,); only the last axis is fixed). With `batch`, a leading axis of images is
    allowed as well. Regions (and images) must number at least one, regions at most `max_regions`."""
    dtype = np.dtype(dtype)
    if dtype.kind not in _REAL_KINDS or dtype.fields is not None:
        extra = " (pickled objects are never loaded)" if dtype.hasobject else ""
        raise QueryError(f"features must be numbers, got dtype {dtype}{extra}")
    shape, single = tuple(int(s) for s in shape), len(expected)
    allowed = (single, single + 1) if batch else (single,)
    if len(shape) not in allowed or shape[-1] != expected[-1]:
        want = _want(expected) + (" or a batch of them" if batch else "")
        raise QueryError(f"features have shape {shape}; this index's model reads {want}")
    if len(shape) == single + 1 and shape[0] < 1:
        raise QueryError(f"features have shape {shape}: a batch of 0 images")
    if single == 2:
        regions = shape[-2]
        if regions < 1 or (max_regions is not None and regions > max_regions):
            upper = f"between 1 and {max_regions} are accepted" if max_regions is not None else "at least 1 is needed"
            raise QueryError(f"{regions} regions; {upper}")


def check_features(features: Any, expected: Sequence[int | None], *, max_regions: int | None = None,
                   batch: bool = False) -> np.ndarray:
    """`features` as a float32 array after `check_feature_shape`; refused as well when a value is NaN or infinite
    (or too large for float32)."""
    array = np.asarray(features) if not isinstance(features, np.ndarray) else features
    check_feature_shape(array.shape, array.dtype, expected, max_regions=max_regions, batch=batch)
    with np.errstate(over="ignore", invalid="ignore"):
        out = array.astype(np.float32)
    if not np.isfinite(out).all():
        raise QueryError("features contain NaN or infinity" if np.issubdtype(array.dtype, np.floating)
                         and not np.isfinite(array).all() else "features contain values too large for float32")
    return out


def check_boxes(boxes: Any, features_shape: Sequence[int]) -> np.ndarray:
    """Region boxes (x1, y1, x2, y2 per region) as float32, shaped as the features' regions: (regions, 4) for one
    image's (regions, dim) features, (batch, regions, 4) for a batch; real and finite."""
    array = np.asarray(boxes) if not isinstance(boxes, np.ndarray) else boxes
    if array.dtype.kind not in _REAL_KINDS or array.dtype.fields is not None:
        raise QueryError(f"boxes must be numbers, got dtype {array.dtype}")
    want = (*tuple(features_shape)[:-1], 4)
    if len(want) < 2 or tuple(array.shape) != want:
        raise QueryError(f"boxes have shape {tuple(array.shape)} for features of shape {tuple(features_shape)}; "
                         f"expected {want}{' per image' if len(want) == 2 else ''}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = array.astype(np.float32)
    if not np.isfinite(out).all():
        raise QueryError("boxes contain NaN or infinity")
    return out
