"""A FAISS index over a gallery of embeddings, stored with the metadata that says what it may be searched with.

An index directory holds `index.faiss` (the FAISS index, inner product on l2-normalised embeddings = the models'
cosine similarity) and `meta.json`: format tag, gallery modality and ids, embedding size, index kind and
parameters, the SHA-256 of `index.faiss`, and whatever the builder adds about the model (name, config, weights
fingerprint; see `itmatch.search`). Opening checks the two files belong together, so a corrupt, truncated or
mismatched pair is refused with one line instead of returning wrong neighbours.

Kinds: `flat` (exact, the default), `ivf` (IndexIVFFlat: k-means into `nlist` lists trained on a sample, `nprobe`
lists searched), `hnsw` (IndexHNSWFlat: graph with `m` links, `ef_construction`, `ef_search`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from itmatch.errors import GalleryIndexError
from itmatch.fileio import atomic_write

FORMAT = "itmatch-index/1"
INDEX_FILE = "index.faiss"
META_FILE = "meta.json"
Kind = Literal["flat", "ivf", "hnsw"]
KINDS: tuple[str, ...] = ("flat", "ivf", "hnsw")


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise GalleryIndexError("the retrieval index needs FAISS: pip install faiss-cpu") from None
    return faiss


@dataclass(frozen=True, slots=True)
class IndexSpec:
    """Which FAISS index to build and how to search it (search-time knobs can be changed on opening)."""

    kind: Kind = "flat"
    nlist: int = 1024  # ivf: number of k-means lists
    nprobe: int = 16  # ivf: lists visited per query
    train_size: int = 0  # ivf: k-means training sample (0 = min(n, 64 * nlist))
    m: int = 32  # hnsw: links per node
    ef_construction: int = 40  # hnsw: candidate list while building
    ef_search: int = 64  # hnsw: candidate list while searching
    seed: int = 0  # ivf: training sample and k-means seed

    def check(self) -> None:
        if self.kind not in KINDS:
            raise GalleryIndexError(f"unknown index kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        for name in ("nlist", "nprobe", "m", "ef_construction", "ef_search"):
            if getattr(self, name) <= 0:
                raise GalleryIndexError(f"index parameter {name} must be > 0, got {getattr(self, name)}")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def as_queries(vectors: np.ndarray | Sequence[float], dim: int) -> np.ndarray:
    """(B, dim) C-contiguous float32 rows (one vector of `dim` becomes a batch of one); a wrong size is one line."""
    arr = np.asarray(vectors)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise GalleryIndexError(f"queries have shape {arr.shape}; this index holds {dim}-d embeddings")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _new_index(spec: IndexSpec, dim: int, train: np.ndarray | None) -> Any:
    faiss = _faiss()
    match spec.kind:
        case "flat":
            return faiss.IndexFlatIP(dim)
        case "hnsw":
            index = faiss.IndexHNSWFlat(dim, spec.m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = spec.ef_construction
            index.hnsw.efSearch = spec.ef_search
            return index
        case "ivf":
            assert train is not None
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, spec.nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = spec.seed
            index.train(train)
            index.nprobe = spec.nprobe
            return index
    raise AssertionError(spec.kind)


def _apply_search_params(index: Any, spec: IndexSpec) -> None:
    if spec.kind == "ivf":
        index.nprobe = spec.nprobe
    elif spec.kind == "hnsw":
        index.hnsw.efSearch = spec.ef_search


@dataclass
class GalleryIndex:
    """A FAISS index plus its metadata; `search` returns gallery rows, scores and ids of the top k."""

    index: Any
    spec: IndexSpec
    ids: list[Any]  # one per gallery row (image ids, caption numbers, ...)
    meta: dict[str, Any] = field(default_factory=dict)  # modality, model, data, ... (JSON-able)

    def __post_init__(self) -> None:
        # read once: each attribute read of a SWIG object costs about a microsecond, per query
        self._dim, self._ntotal = int(self.index.d), int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return self._dim

    def __len__(self) -> int:
        return self._ntotal

    @classmethod
    def build(cls, vectors: np.ndarray | Sequence[np.ndarray], ids: Sequence[Any] | None = None,
              spec: IndexSpec | None = None, *, meta: dict[str, Any] | None = None, chunk: int = 65536,
              progress: bool = False) -> GalleryIndex:
        """Index `vectors`, an (N, D) array or a sequence of (n_i, D) chunks (added chunk by chunk).

        Embeddings should be l2-normalised: the index ranks by inner product, which is then the cosine similarity
        the embedding models are trained with.
        """
        spec = spec or IndexSpec()
        spec.check()
        chunks = [vectors] if isinstance(vectors, np.ndarray) else list(vectors)
        if not chunks or any(c.ndim != 2 for c in chunks) or len({c.shape[1] for c in chunks}) != 1:
            raise GalleryIndexError("gallery vectors must be one (N, D) array or (n, D) chunks of one width D")
        n, dim = sum(len(c) for c in chunks), chunks[0].shape[1]
        if n == 0:
            raise GalleryIndexError("the gallery is empty; nothing to index")
        ids = list(range(n)) if ids is None else list(ids)
        if len(ids) != n:
            raise GalleryIndexError(f"{len(ids)} ids for {n} gallery vectors")
        train = None
        if spec.kind == "ivf":
            if n < spec.nlist:
                raise GalleryIndexError(f"ivf with nlist={spec.nlist} needs at least that many gallery items, got {n};"
                                        " lower --nlist (about sqrt(N) to 4*sqrt(N) is usual) or use --kind flat")
            size = min(n, spec.train_size or 64 * spec.nlist)
            rows = np.sort(np.random.default_rng(spec.seed).choice(n, size=size, replace=False))
            train = _take_rows(chunks, rows)
        index = _new_index(spec, dim, train)
        with tqdm(total=n, desc=f"index ({spec.kind})", unit="vec", disable=not progress, leave=False) as bar:
            for part in chunks:
                for start in range(0, len(part), chunk):
                    block = np.ascontiguousarray(part[start : start + chunk], dtype=np.float32)
                    index.add(block)
                    bar.update(len(block))
        return cls(index, spec, ids, dict(meta or {}))

    def search(self, queries: np.ndarray | Sequence[float], k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (B, k'), best first, k' = min(k, gallery size); a 1-d query is a batch of one."""
        if k <= 0:
            raise GalleryIndexError(f"k must be > 0, got {k}")
        if not (isinstance(queries, np.ndarray) and queries.dtype == np.float32 and queries.ndim == 2
                and queries.shape[1] == self._dim and queries.flags.c_contiguous):
            queries = as_queries(queries, self._dim)
        return self.index.search(queries, min(k, self._ntotal))

    def ids_of(self, rows: np.ndarray) -> list[list[Any]]:
        """Gallery ids for a (B, k) array of rows (FAISS marks missing results, from IVF/HNSW, with -1)."""
        return [[self.ids[r] for r in row if r >= 0] for row in rows.tolist()]

    def with_search_params(self, **params: int) -> GalleryIndex:
        """Change search-time parameters (nprobe, ef_search) in place; returns self."""
        unknown = sorted(set(params) - {"nprobe", "ef_search"})
        if unknown:
            raise GalleryIndexError(f"{unknown[0]} is not a search-time parameter (nprobe, ef_search)")
        self.spec = replace(self.spec, **{k: v for k, v in params.items() if v is not None})
        self.spec.check()
        _apply_search_params(self.index, self.spec)
        return self

    # ------------------------------------------------------------------------------------------- storage
    def save(self, directory: str | os.PathLike) -> Path:
        """Write `index.faiss` then `meta.json` (each atomically; the meta names the index file's hash)."""
        faiss = _faiss()
        out = Path(directory)
        if out.exists() and not out.is_dir():
            raise GalleryIndexError(f"{out} exists and is not a directory; an index is a directory")
        data = faiss.serialize_index(self.index)  # uint8 array
        atomic_write(out / INDEX_FILE, lambda fh: fh.write(memoryview(data)))
        meta = {
            **self.meta,
            "format": FORMAT,
            "faiss_version": faiss.__version__,
            "index": {"file": INDEX_FILE, "sha256": hashlib.sha256(memoryview(data)).hexdigest(),
                      "ntotal": len(self), "dim": self.dim, **asdict(self.spec)},
            "ids": self.ids,
        }
        meta["checksum"] = meta_checksum(meta)
        atomic_write(out / META_FILE, lambda fh: fh.write((json.dumps(meta) + "\n").encode("utf-8")))
        return out

    @classmethod
    def open(cls, directory: str | os.PathLike, *, verify: bool = True) -> GalleryIndex:
        """Read an index directory; refuse (one line) a missing/corrupt file or a meta that names another index."""
        meta = read_meta(directory)
        path = Path(directory) / INDEX_FILE
        info = meta["index"]
        if (path.is_symlink() or path.exists()) and not path.is_file():  # a device, a dangling link, a directory
            raise GalleryIndexError(f"{path} is not a regular file; rebuild with `itmatch index build`")
        if not path.is_file():
            raise GalleryIndexError(f"{directory}: {INDEX_FILE} is missing; rebuild with `itmatch index build`")
        if verify and file_sha256(path) != info.get("sha256"):
            raise GalleryIndexError(f"{path} does not match {META_FILE} (its SHA-256 differs: corrupt, or written by "
                                    "another build); rebuild with `itmatch index build`")
        try:
            index = _faiss().read_index(str(path))
        except RuntimeError as err:
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise GalleryIndexError(f"{path}: not a readable FAISS index ({reason[:160]})") from None
        if int(index.ntotal) != info.get("ntotal") or int(index.d) != info.get("dim"):
            raise GalleryIndexError(f"{path} holds {index.ntotal} x {index.d} vectors but {META_FILE} says "
                                    f"{info.get('ntotal')} x {info.get('dim')}; rebuild with `itmatch index build`")
        if len(meta["ids"]) != index.ntotal:
            raise GalleryIndexError(f"{directory}/{META_FILE}: {len(meta['ids'])} ids for {index.ntotal} vectors")
        fields = {f.name for f in dataclasses.fields(IndexSpec)}
        try:
            spec = IndexSpec(**{k: v for k, v in info.items() if k in fields})
            spec.check()
        except (TypeError, GalleryIndexError) as err:
            raise GalleryIndexError(f"{directory}/{META_FILE}: bad index parameters ({err})") from None
        _apply_search_params(index, spec)
        rest = {k: v for k, v in meta.items() if k not in ("index", "ids", "format", "faiss_version")}
        return cls(index, spec, list(meta["ids"]), rest)


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The `meta.json` of an index directory, checked for its format tag and required keys."""
    root = Path(directory)
    path = root / META_FILE
    if not root.is_dir():
        raise GalleryIndexError(f"index not found: {root} (build one with `itmatch index build CKPT --data DIR "
                                f"--out {root}`)")
    if not path.is_file():
        raise GalleryIndexError(f"{root}: no {META_FILE}; not an itmatch index directory (or its build was "
                                "interrupted); rebuild with `itmatch index build`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GalleryIndexError(f"{path}: corrupt index metadata ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise GalleryIndexError(f"{path}: not itmatch index metadata (format {found!r}, expected {FORMAT!r})")
    missing = [k for k in ("index", "ids") if k not in meta]
    if missing or not isinstance(meta["index"], dict) or not isinstance(meta["ids"], list):
        raise GalleryIndexError(f"{path}: corrupt index metadata (missing or malformed {missing or ['index', 'ids']})")
    if meta.get("checksum") != meta_checksum(meta):
        raise GalleryIndexError(f"{path} was changed after the index was built (its checksum differs: ids, texts or "
                                "settings edited, or an index of an older itmatch); rebuild with `itmatch index build`")
    return meta


def meta_checksum(meta: dict[str, Any]) -> str:
    """SHA-256 of the metadata without its own checksum (canonical JSON): a permuted id list is caught."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def _take_rows(chunks: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """Rows (sorted, global numbering) gathered from a list of chunks, as one float32 array."""
    out, start = [], 0
    for part in chunks:
        lo, hi = np.searchsorted(rows, [start, start + len(part)])
        out.append(np.asarray(part[rows[lo:hi] - start], dtype=np.float32))
        start += len(part)
    return np.ascontiguousarray(np.concatenate(out))
