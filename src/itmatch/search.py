"""Search a gallery with a trained model: build an index from a checkpoint, query it with text or an image.

Stage one ranks the whole gallery with an embedding model (VSE++, VSE-infinity, VSRN, HREM: one l2-normalised vector
per image and per caption, similarity = inner product) through a FAISS index (`itmatch.index`). Cross-attention
models (SCAN, GSMN) score a pair only after attending over its regions and words, so they cannot be indexed; they
re-rank: stage two scores the query against the `candidates` best items of stage one with the cross-attention
model's own `similarity` and keeps the best k. With `candidates` = gallery size that is the cross-attention model's
exhaustive ranking; smaller values trade recall for speed.

The index records the model it was built with (name, config, SHA-256 of its weights), the dataset files it encoded
(size, mtime, SHA-256) and its gallery ids; `Searcher.open` refuses, with one line, a checkpoint whose weights or
config differ (a stale index), a text query against a caption gallery and the like.

    searcher = Searcher.open("runs/index_test", rerank="runs/scan/model_best.pt", candidates=50)
    hits = searcher.search_text("a red cube left of a blue ball", k=10)[0]   # [Hit(rank, score, id, row, ...)]
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from itmatch.checkpoints.loader import LoadedModel, load_model
from itmatch.config import config_to_dict
from itmatch.data.gsmn_files import (
    load_parser,
    parse_dependencies,
    read_dependencies,
    read_precaps,
    reads_dependencies,
    reads_precaps,
    split_boxes,
)
from itmatch.data.precomp import PrecompSplit, read_captions, resolve_root
from itmatch.data.tokenize import tokenize
from itmatch.errors import DataError, GalleryIndexError
from itmatch.index import GalleryIndex, IndexSpec, file_sha256, read_meta
from itmatch.inference import encode_captions, encode_images, image_rows
from itmatch.models.base import Encoded

_logger = logging.getLogger(__name__)

Gallery = Literal["images", "captions"]
# Config keys that move a model or tune speed without changing its scores.
_NEUTRAL_KEYS = frozenset({"bert_path", "xattn_budget_mb"})


def weights_sha256(model: torch.nn.Module) -> str:
    """Fingerprint of a model's weights: SHA-256 over (name, dtype, shape, bytes) of its state dict, in key order.

    Independent of the file they were read from, so a copied or re-saved checkpoint matches its index."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"file": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path)}


def check_file_record(record: dict[str, Any], where: str) -> None:
    """Refuse a data file changed since the index was built (size, else hash when its mtime moved)."""
    path = Path(record["file"])
    if not path.is_file():
        raise GalleryIndexError(f"{where}: {path}, which the index was built from, is missing; pass --data DIR")
    stat = path.stat()
    if stat.st_size != record["size"] or (stat.st_mtime_ns != record["mtime_ns"]
                                         and file_sha256(path) != record["sha256"]):
        raise GalleryIndexError(f"{where} is stale: {path} changed since the index was built; rebuild the index")


@dataclass(frozen=True, slots=True)
class Hit:
    """One ranked gallery item."""

    rank: int  # 1-based
    score: float  # similarity of the model that ranked it (the re-ranker's when re-ranking)
    id: Any  # image id, or caption number in the split
    row: int  # gallery row (index position)
    text: str | None = None  # the caption, for caption galleries
    image_id: Any = None  # the caption's image, for caption galleries
    first_score: float | None = None  # the embedding model's score, when re-ranked


def _model_summary(loaded: LoadedModel) -> dict[str, Any]:
    return {"name": loaded.config.model.name, "config": config_to_dict(loaded.config)["model"],
            "weights_sha256": weights_sha256(loaded.model), "checkpoint": str(Path(loaded.path).resolve())}


def build_index(ckpt: str | os.PathLike, data: str | os.PathLike, *, split: str = "test",
                gallery: Gallery = "images", spec: IndexSpec | None = None, out: str | os.PathLike | None = None,
                batch_size: int = 128, device: str = "cpu", vocab: str = "", bert_path: str = "",
                progress: bool = False) -> GalleryIndex:
    """Encode every image (or caption) of a dataset split with an embedding model and index it; save it to `out`."""
    if gallery not in ("images", "captions"):
        raise GalleryIndexError(f"gallery must be 'images' or 'captions', got {gallery!r}")
    root = resolve_root(data, split)
    loaded = load_model(ckpt, device=device, vocab=vocab, bert_path=bert_path, data_root=root)
    if not loaded.model.is_embedding_model():  # before encoding anything: GSMN's encoders would ask for boxes
        raise _cross_attention_error(loaded, ckpt)
    split_data = PrecompSplit(root, split)
    meta: dict[str, Any] = {
        "modality": gallery,
        "model": _model_summary(loaded),
        "data": {"root": str(root.resolve()), "split": split, "images": file_record(split_data.images.path),
                 "captions": file_record(root / f"{split}_caps.txt"), "image_shape": list(split_data.images.shape[1:])},
    }
    if gallery == "images":
        rows = image_rows(split_data)
        encoded = encode_images(loaded.model, split_data, batch_size=batch_size, device=device, progress=progress)
        ids = [split_data.ids[r] if split_data.ids else r for r in rows]
        meta["feature_rows"] = rows
    else:
        tokens = [loaded.vocab.encode(c) for c in split_data.captions]
        encoded = encode_captions(loaded.model, tokens, batch_size=batch_size, device=device, progress=progress)
        ids = list(range(split_data.n_captions))
        meta["texts"] = list(split_data.captions)
        image_of = [split_data.image_of(k) for k in ids]
        meta["image_ids"] = [split_data.ids[r] if split_data.ids else r for r in image_of]
    _require_pooled(encoded, loaded, ckpt)
    index = GalleryIndex.build(encoded.emb.float().numpy(), ids, spec, meta=meta, progress=progress)
    if out is not None:
        index.save(out)
    return index


def _cross_attention_error(loaded: LoadedModel, ckpt: str | os.PathLike) -> GalleryIndexError:
    return GalleryIndexError(
        f"{ckpt}: {loaded.config.model.name} scores pairs with cross-attention over per-region/per-word features, "
        f"which an index cannot hold; index an embedding model (vsepp, vse_infinity, vsrn, hrem) and re-rank its "
        f"top candidates with this one (`itmatch search INDEX --rerank {ckpt}`)"
    )


def _require_pooled(encoded: Encoded, loaded: LoadedModel, ckpt: str | os.PathLike) -> None:
    if encoded.emb.ndim != 2 or encoded.lengths is not None or encoded.offsets is not None:
        raise _cross_attention_error(loaded, ckpt)


def check_model(meta: dict[str, Any], loaded: LoadedModel, where: str) -> None:
    """Refuse a model other than the one the index was built with (name, scoring config, weights)."""
    built = meta.get("model")
    if not isinstance(built, dict) or not {"name", "config", "weights_sha256"} <= set(built):
        raise GalleryIndexError(f"{where}: the metadata does not record its model; rebuild with `itmatch index build`")
    now = _model_summary(loaded)
    if now["name"] != built["name"]:
        raise GalleryIndexError(f"{where} was built with a {built['name']} model but {loaded.path} is a "
                                f"{now['name']} model; query it with {built.get('checkpoint')} or rebuild the index")
    changed = sorted(k for k in set(now["config"]) | set(built["config"])
                     if k not in _NEUTRAL_KEYS and now["config"].get(k) != built["config"].get(k))
    if changed:
        key = changed[0]
        raise GalleryIndexError(f"{where} was built with model.{key}={built['config'].get(key)!r} but {loaded.path} "
                                f"has {now['config'].get(key)!r}; rebuild the index with this checkpoint")
    if now["weights_sha256"] != built["weights_sha256"]:
        raise GalleryIndexError(
            f"{where} is stale: built from weights {built['weights_sha256'][:12]} ({built.get('checkpoint')}) but "
            f"{loaded.path} holds weights {now['weights_sha256'][:12]}; rebuild it with `itmatch index build`"
        )


def encoder_inputs(loaded: LoadedModel) -> frozenset[str]:
    """What a model's encoders read besides features and word ids, named as its `extra_inputs`: "boxes" (per image)
    and "depends" (per caption, for configs with `sparse`, as `gsmn_files.model_inputs` reads them). Names that only
    training reads (HREM's "image_ids") are not included."""
    declared = set(getattr(loaded.model, "extra_inputs", ()))
    needed = declared & {"boxes"}
    if "depends" in declared and reads_dependencies(loaded.config.model):
        needed.add("depends")
    return frozenset(needed)


class Searcher:
    """An opened index with the model that built it (and optionally a re-ranker); answers text and image queries.

    A re-ranker whose encoders read more than features and word ids (`encoder_inputs`: GSMN's boxes and, sparse,
    dependency pairs) gets them as evaluation does: the boxes of candidate and query images from the dataset
    (`split_boxes`, each box divided by its image's size), the dependency pairs of candidate captions from the
    dataset's `{split}_caps.json` (a parse of their text when it has none) and those of a text query from spaCy's
    parse of its tokens.
    """

    def __init__(self, index: GalleryIndex, model: LoadedModel, *, reranker: LoadedModel | None = None,
                 candidates: int = 100, data: str | os.PathLike | None = None, device: str = "cpu",
                 where: str = "index") -> None:
        self.index, self.model, self.reranker = index, model, reranker
        self.candidates, self.device, self.where = candidates, device, where
        self.modality: Gallery = index.meta.get("modality", "images")
        built = index.meta.get("data", {})
        self.data_root = Path(data) if data is not None else Path(built["root"]) if built.get("root") else None
        self.split = built.get("split", "test")
        self._gallery_features: PrecompSplit | None = None
        self._needs = frozenset() if reranker is None else encoder_inputs(reranker)
        self._boxes: dict[tuple[str, str], np.ndarray] = {}  # normalised boxes per (dataset directory, split)
        self._caption_inputs: dict[str, list] = {}  # per caption row: "depends", "tokens" read from the dataset
        self._parser: Any = None  # spaCy, loaded once (about 0.3 s; a caption's parse takes 2 ms)
        self._parser_lock = threading.Lock()
        if reranker is not None:
            if candidates <= 0:
                raise GalleryIndexError(f"--candidates must be > 0, got {candidates}")
            if self.modality == "images":  # stage two encodes the candidate images from the dataset
                self._gallery_features = self._dataset()
                self._check_image_dim(reranker, self._gallery_features.feature_dim)
                if "boxes" in self._needs:  # read now: missing box files are refused on opening, not per query
                    self._split_boxes(self._gallery_features)
            else:
                self._caption_inputs = self._dataset_caption_inputs(reranker)
            if "depends" in self._needs and "depends" not in self._caption_inputs:  # queries or captions are parsed
                self._load_parser()  # now: a missing parser is refused on opening, and the first query is not slower

    @classmethod
    def open(cls, directory: str | os.PathLike, *, ckpt: str | os.PathLike | None = None,
             rerank: str | os.PathLike | None = None, candidates: int = 100, data: str | os.PathLike | None = None,
             device: str = "cpu", vocab: str = "", bert_path: str = "", nprobe: int | None = None,
             ef_search: int | None = None, verify: bool = True) -> Searcher:
        """Open an index with its model: `ckpt` (default: the checkpoint recorded at build time) must hold the same
        weights; `rerank` names a second model scoring the top `candidates` of stage one."""
        meta = read_meta(directory)  # metadata problems first: they say more than a failing FAISS read
        built = meta.get("model") if isinstance(meta.get("model"), dict) else {}
        ckpt = ckpt or built.get("checkpoint")
        if not ckpt:
            raise GalleryIndexError(f"{directory}: the metadata names no checkpoint; pass --ckpt CKPT")
        index = GalleryIndex.open(directory, verify=verify).with_search_params(nprobe=nprobe, ef_search=ef_search)
        root = Path(data) if data else Path(meta["data"]["root"]) if meta.get("data", {}).get("root") else None
        loaded = load_model(ckpt, device=device, vocab=vocab, bert_path=bert_path, data_root=root)
        check_model(index.meta, loaded, str(directory))
        reranker = None
        if rerank is not None:
            reranker = load_model(rerank, device=device, vocab=vocab, bert_path=bert_path, data_root=root)
        return cls(index, loaded, reranker=reranker, candidates=candidates, data=data, device=device,
                   where=str(directory))

    # ------------------------------------------------------------------------------------------------ queries
    def search_text(self, texts: str | Sequence[str], k: int = 10) -> list[list[Hit]]:
        """Text -> image: the k best gallery images for each query (an image index is needed)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        self.require_gallery("images")
        if self.reranker is not None and reads_precaps(self.reranker.config.model):
            raise GalleryIndexError(
                f"{self.reranker.path}: this {self.reranker.config.model.name} model reads caption word ids from "
                f"{self.split}_precaps_stan.txt (model.text_ids = 'precaps_stan'), so it cannot encode a free-text "
                "query; re-rank text queries with a model trained on the vocabulary (text_ids = 'vocab')")
        queries = self._encode_texts(self.model, texts)
        _require_pooled(queries, self.model, self.model.path)
        return self._search(queries.emb.float().numpy(), k, texts)

    def search_image(self, features: np.ndarray, k: int = 10, *, boxes: np.ndarray | None = None) -> list[list[Hit]]:
        """Image -> text: the k best gallery captions for each query image, given as features (R, D) / (B, R, D)
        (region features, as the dataset's `{split}_ims.npy` rows) or (D,) / (B, D) for grid-free models.

        `boxes` (R, 4) / (B, R, 4): each region's x1, y1, x2, y2 divided by its image's width and height, needed by
        re-rankers that read the regions' geometry (GSMN); `image_inputs` gives a dataset image's.
        """
        self.require_gallery("captions")
        feats = np.asarray(features, dtype=np.float32)
        single = len(self.index.meta.get("data", {}).get("image_shape", [feats.shape[-1]]))  # ndim of one image
        batch = feats[None] if feats.ndim == single else feats
        query_boxes = self._query_boxes(boxes, batch)
        queries = self._encode_features(self.model, batch)
        _require_pooled(queries, self.model, self.model.path)
        return self._search(queries.emb.float().numpy(), k, list(zip(batch, query_boxes, strict=True)))

    def require_gallery(self, gallery: Gallery) -> None:
        """Refuse a query of the wrong side: text queries search images, image queries search captions."""
        if self.modality != gallery:
            query = "text" if gallery == "images" else "image"
            raise GalleryIndexError(f"{self.where} holds {self.modality}; {query} queries need an index of {gallery} "
                                    f"(`itmatch index build ... --gallery {gallery}`)")

    def image_features(self, image_id: Any, data: str | os.PathLike | None = None,
                       split: str | None = None) -> np.ndarray:
        """Region features of a dataset image, found by its id (`{split}_ids.txt`; the row without such a file)."""
        split_data, row = self._dataset_image(image_id, data, split)
        return np.asarray(split_data.images[row], dtype=np.float32)

    def image_inputs(self, image_id: Any, data: str | os.PathLike | None = None,
                     split: str | None = None) -> dict[str, np.ndarray]:
        """What the re-ranker reads about a dataset image besides its features, to pass on as
        `search_image(features, **inputs)`: {"boxes": (R, 4)} for GSMN (normalised as in evaluation), else {}."""
        if "boxes" not in self._needs:
            return {}
        split_data, row = self._dataset_image(image_id, data, split)
        return {"boxes": self._split_boxes(split_data)[row]}

    # ------------------------------------------------------------------------------------------------ internals
    def _search(self, vectors: np.ndarray, k: int, raw_queries: list[Any]) -> list[list[Hit]]:
        depth = max(k, self.candidates) if self.reranker is not None else k
        scores, rows = self.index.search(vectors, depth)
        out = []
        for qi, (score_row, row_row) in enumerate(zip(scores.tolist(), rows.tolist(), strict=True)):
            found = [(s, r) for s, r in zip(score_row, row_row, strict=True) if r >= 0]
            if self.reranker is not None and found:
                second = self._rerank(raw_queries[qi], [r for _, r in found])
                order = sorted(range(len(found)), key=lambda i: (-second[i], i))[:k]
                ranked = [(second[i], found[i][1], found[i][0]) for i in order]
            else:
                ranked = [(s, r, None) for s, r in found[:k]]
            out.append([self._hit(rank, s, r, first) for rank, (s, r, first) in enumerate(ranked, 1)])
        return out

    def _hit(self, rank: int, score: float, row: int, first: float | None) -> Hit:
        meta = self.index.meta
        if self.modality == "captions":
            return Hit(rank, float(score), self.index.ids[row], row, meta["texts"][row], meta["image_ids"][row],
                       first_score=first)
        return Hit(rank, float(score), self.index.ids[row], row, first_score=first)

    @torch.inference_mode()
    def _rerank(self, query: Any, rows: list[int]) -> list[float]:
        """Stage two: the re-ranker's similarity between one raw query and the candidate gallery rows."""
        assert self.reranker is not None
        model = self.reranker
        if self.modality == "images":
            assert self._gallery_features is not None
            feature_rows = np.asarray([self.index.meta["feature_rows"][r] for r in rows])
            boxes = self._split_boxes(self._gallery_features)[feature_rows] if "boxes" in self._needs else None
            images = self._encode_features(model, self._gallery_features.images[feature_rows], boxes)
            depends = self._parse([query]) if "depends" in self._needs else None
            texts = self._encode_texts(model, [query], depends=depends)
            sims = model.model.similarity(images, texts)[:, 0]  # (k,)
        else:
            feats, boxes = query
            self._check_image_dim(model, np.shape(feats)[-1])
            images = self._encode_features(model, np.asarray(feats, dtype=np.float32)[None],
                                           None if boxes is None else boxes[None])
            texts = self._encode_gallery_captions(model, rows)
            sims = model.model.similarity(images, texts)[0]  # (k,)
        return sims.double().cpu().tolist()

    def _encode_texts(self, model: LoadedModel, texts: list[str], *, depends: list | None = None) -> Encoded:
        return encode_captions(model.model, [model.vocab.encode(t) for t in texts], device=self.device,
                               depends=depends)

    def _encode_gallery_captions(self, model: LoadedModel, rows: list[int]) -> Encoded:
        """The re-ranker's encoding of gallery captions: word ids and dependency pairs from the dataset when it has
        them (`_dataset_caption_inputs`), else the vocabulary's ids and a parse of the index's caption texts."""
        texts, known = self.index.meta["texts"], self._caption_inputs
        tokens = ([known["tokens"][r] for r in rows] if "tokens" in known
                  else [model.vocab.encode(texts[r]) for r in rows])
        depends = None
        if "depends" in self._needs:
            depends = ([known["depends"][r] for r in rows] if "depends" in known
                       else self._parse([texts[r] for r in rows]))
        return encode_captions(model.model, tokens, device=self.device, depends=depends)

    @torch.inference_mode()
    def _encode_features(self, model: LoadedModel, feats: np.ndarray, boxes: np.ndarray | None = None) -> Encoded:
        self._check_image_dim(model, feats.shape[-1])
        images = torch.from_numpy(np.ascontiguousarray(feats)).float().to(self.device)
        if boxes is None:
            return model.model.encode_image(images).to("cpu")
        boxes_t = torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)).to(self.device)
        return model.model.encode_image(images, boxes=boxes_t).to("cpu")

    def _parse(self, texts: list[str]) -> list[list[list[int]]]:
        """Dependency pairs of texts, on the tokens `Vocabulary.encode` frames with <start> and <end>, so that pair
        positions are positions in the word ids; a text without words has none."""
        tokens = [tokenize(t) for t in texts]
        words = [t for t in tokens if t]
        with self._parser_lock:  # one spaCy pipeline, shared by the service's threads
            parsed = iter(parse_dependencies(words, parser=self._load_parser()) if words else [])
        return [next(parsed) if t else [] for t in tokens]

    def _load_parser(self) -> Any:
        if self._parser is None:
            self._parser = load_parser()
        return self._parser

    def _query_boxes(self, boxes: np.ndarray | None, batch: np.ndarray) -> list[np.ndarray | None]:
        """Per query image, the (R, 4) boxes the re-ranker reads (None for each when it reads none)."""
        if "boxes" not in self._needs:
            return [None] * len(batch)
        assert self.reranker is not None
        if boxes is None:
            raise GalleryIndexError(
                f"{self.reranker.config.model.name} re-ranking needs the boxes of the query image's regions: query a "
                "dataset image by its id (`itmatch search INDEX --image ID`, or `Searcher.image_inputs`), or give "
                "(regions, 4) boxes x1, y1, x2, y2 divided by the image's width and height with the features "
                "(`--image-boxes FILE`, `search_image(features, boxes=...)`)")
        arr = np.asarray(boxes, dtype=np.float32)
        arr = arr[None] if arr.ndim == 2 else arr
        if batch.ndim == 3 and arr.shape != (*batch.shape[:2], 4):
            raise GalleryIndexError(f"boxes of shape {np.shape(boxes)} for query features of shape {batch.shape}; "
                                    f"expected ({batch.shape[1]}, 4) per image")
        if not np.isfinite(arr).all():
            raise GalleryIndexError("boxes contain NaN or infinity")
        return list(arr)

    def _dataset_image(self, image_id: Any, data: str | os.PathLike | None,
                       split: str | None) -> tuple[PrecompSplit, int]:
        split = split or self.split
        split_data = PrecompSplit(resolve_root(data or self.data_root or ".", split), split)
        ids = split_data.ids or list(range(len(split_data.images)))
        matches = [row for row, i in enumerate(ids) if str(i) == str(image_id)]
        if not matches:
            raise GalleryIndexError(f"no image with id {image_id} in {split_data.root}/{split_data.split}_ids.txt"
                                    if split_data.ids else f"no image row {image_id} in {split_data.images.path}")
        return split_data, matches[0]

    def _split_boxes(self, split_data: PrecompSplit) -> np.ndarray:
        """(feature rows, R, 4) boxes of a split, each divided by its image's size (`model_inputs`' default
        geometry, which evaluation feeds the model), read once per split."""
        key = (str(split_data.root.resolve()), split_data.split)
        if key not in self._boxes:
            name = self.reranker.config.model.name if self.reranker is not None else "the re-ranker"
            try:
                boxes = split_boxes(split_data.root, split_data.split, len(split_data.images))
            except DataError as err:
                raise GalleryIndexError(f"{name} re-ranking reads the boxes of every region: {err}") from None
            if split_data.images.ndim != 3 or boxes.shape[1] != split_data.images.shape[1]:
                raise GalleryIndexError(f"{split_data.root}/{split_data.split}_ims_bbx.npy has {boxes.shape[1]} "
                                        f"boxes per image for features of shape {split_data.images.shape}")
            self._boxes[key] = boxes
        return self._boxes[key]

    def _dataset_caption_inputs(self, reranker: LoadedModel) -> dict[str, list]:
        """What the re-ranker reads per gallery caption from the dataset, as evaluation does: dependency pairs
        (sparse: `{split}_caps.json`) and word ids (text_ids = 'precaps_stan': `{split}_precaps_stan.txt`).

        Without caps.json (or without the dataset) the candidates' texts are parsed per query instead; the
        precaps ids have no such substitute, and neither do their pairs (a parse of our tokens would not fit them).
        """
        wants_depends, pretokenized = "depends" in self._needs, reads_precaps(reranker.config.model)
        if not (wants_depends or pretokenized):
            return {}
        n = len(self.index.meta["texts"])
        root = self._caption_root()
        out: dict[str, list] = {}
        name = reranker.config.model.name
        try:
            if wants_depends and root is not None and (root / f"{self.split}_caps.json").is_file():
                out["depends"] = read_dependencies(root / f"{self.split}_caps.json", n)
            if pretokenized:
                if root is None:
                    raise GalleryIndexError(
                        f"{reranker.path}: this {name} model reads caption word ids from {self.split}_precaps_stan.txt "
                        f"(model.text_ids = 'precaps_stan'); pass --data DIR, the dataset {self.where} was built from")
                out["tokens"] = read_precaps(root / f"{self.split}_precaps_stan.txt", n)
                if wants_depends and "depends" not in out:
                    raise GalleryIndexError(
                        f"{reranker.path}: this sparse {name} model reads precaps_stan word ids, whose dependency "
                        f"pairs are {root / f'{self.split}_caps.json'}, which is missing (a parse of the caption "
                        "text would not fit those ids)")
        except DataError as err:
            raise GalleryIndexError(f"{name} re-ranking of {self.where}: {err}") from None
        if wants_depends and "depends" not in out:
            _logger.info("%s: no %s_caps.json with its captions; parsing the candidate captions", self.where,
                         self.split)
        return out

    def _caption_root(self) -> Path | None:
        """The dataset directory of the index's split when its `{split}_caps.txt` still holds the indexed captions
        (so its per-caption files line up with the gallery rows), else None."""
        if self.data_root is None:
            return None
        try:
            root = resolve_root(self.data_root, self.split)
            captions = read_captions(root / f"{self.split}_caps.txt")
        except DataError:
            return None
        texts = self.index.meta["texts"]
        if captions[: len(texts)] != texts:
            _logger.warning("%s: %s/%s_caps.txt no longer holds the indexed captions; not reading its per-caption "
                            "files", self.where, root, self.split)
            return None
        return root

    @staticmethod
    def _check_image_dim(model: LoadedModel, dim: int) -> None:
        expected = getattr(model.config.model, "image_dim", None)
        if expected and expected != dim:
            raise GalleryIndexError(f"{model.path}: {model.config.model.name} reads {expected}-d image features but "
                                    f"the query/gallery features are {dim}-d")

    def _dataset(self) -> PrecompSplit:
        if self.data_root is None:
            raise GalleryIndexError(f"{self.where}: re-ranking images needs the dataset; pass --data DIR")
        split_data = PrecompSplit(resolve_root(self.data_root, self.split), self.split)
        built = self.index.meta.get("data", {})
        if "images" in built and split_data.images.path.resolve() == Path(built["images"]["file"]):
            check_file_record(built["images"], self.where)
        return split_data
