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
from itmatch.data.precomp import PrecompSplit, read_captions, resolve_root
from itmatch.errors import DataError, GalleryIndexError, QueryError
from itmatch.index import GalleryIndex, IndexSpec, file_sha256, read_meta
from itmatch.inference import encode_captions, encode_images, image_rows
from itmatch.method import Inputs, SplitInputs
from itmatch.models.base import Encoded
from itmatch.registry import method_spec
from itmatch.validate import check_boxes, check_features, check_k, check_text

_logger = logging.getLogger(__name__)

Gallery = Literal["images", "captions"]


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
    neutral = method_spec(now["name"]).neutral_keys  # keys that move the model or tune speed, never a score
    changed = sorted(k for k in set(now["config"]) | set(built["config"])
                     if k not in neutral and now["config"].get(k) != built["config"].get(k))
    if changed:
        key = changed[0]
        raise GalleryIndexError(f"{where} was built with model.{key}={built['config'].get(key)!r} but {loaded.path} "
                                f"has {now['config'].get(key)!r}; rebuild the index with this checkpoint")
    if now["weights_sha256"] != built["weights_sha256"]:
        raise GalleryIndexError(
            f"{where} is stale: built from weights {built['weights_sha256'][:12]} ({built.get('checkpoint')}) but "
            f"{loaded.path} holds weights {now['weights_sha256'][:12]}; rebuild it with `itmatch index build`"
        )


def model_inputs(loaded: LoadedModel) -> Inputs | None:
    """What a model's encoders read besides features and word ids (its method's `inputs`), or None."""
    return method_spec(loaded.config.model.name).inputs(loaded.config.model)


class Searcher:
    """An opened index with the model that built it (and optionally a re-ranker); answers text and image queries.

    A re-ranker whose encoders read more than features and word ids (its method's `inputs`, e.g. GSMN's boxes and,
    sparse, dependency pairs) gets them as evaluation does: per-image inputs of candidate and query images from the
    dataset (`Inputs.for_split`), per-caption inputs of candidate captions from the dataset when it holds them
    (`Inputs.for_captions`) and otherwise, as for a text query, from their text (`Inputs.for_texts`).
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
        self._inputs = None if reranker is None else model_inputs(reranker)
        self._image_inputs: dict[tuple[str, str], dict[str, Any]] = {}  # per (dataset directory, split), by row
        self._caption_inputs = SplitInputs()  # per gallery caption, what the dataset holds
        self._parser: Any = None  # e.g. spaCy for GSMN, loaded once (about 0.3 s; a caption's parse takes 2 ms)
        self._parser_lock = threading.Lock()
        if reranker is not None:
            if candidates <= 0:
                raise GalleryIndexError(f"--candidates must be > 0, got {candidates}")
            if self.modality == "images":  # stage two encodes the candidate images from the dataset
                self._gallery_features = self._dataset()
                self._check_image_dim(reranker, self._gallery_features.feature_dim)
                if self._inputs is not None and self._inputs.image:  # read now: missing files are refused on opening
                    self._split_image_inputs(self._gallery_features)
            else:
                self._caption_inputs = self._dataset_caption_inputs(reranker)
            missing = self._inputs is not None and set(self._inputs.caption) - set(self._caption_inputs.captions)
            if missing:  # queries or captions are parsed: a missing parser is refused now, and no query is slower
                self._load_parser()

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
        if not texts:
            raise QueryError("no text query given")
        texts = [check_text(t) for t in texts]
        k = check_k(k)
        if self._inputs is not None and self._inputs.pretokenized:
            assert self.reranker is not None
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
        k = check_k(k)
        built = self.index.meta.get("data", {}).get("image_shape")  # one image's shape; unrecorded: one vector
        shape = list(built) if built else [np.shape(features)[-1] if np.ndim(features) else None]
        feats = check_features(features, list(shape), batch=True)  # real, finite, the index's shape, >= 1 region
        if boxes is not None:
            boxes = check_boxes(boxes, feats.shape)
        single = len(shape)  # ndim of one image
        batch = feats[None] if feats.ndim == single else feats
        query_inputs = self._query_inputs(batch, {} if boxes is None else {"boxes": boxes})
        queries = self._encode_features(self.model, batch)
        _require_pooled(queries, self.model, self.model.path)
        per_query = [{name: values[i] for name, values in query_inputs.items()} for i in range(len(batch))]
        return self._search(queries.emb.float().numpy(), k, list(zip(batch, per_query, strict=True)))

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
        if self._inputs is None or not self._inputs.image:
            return {}
        split_data, row = self._dataset_image(image_id, data, split)
        return {name: values[row] for name, values in self._split_image_inputs(split_data).items()}

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
            reads = self._inputs is not None and bool(self._inputs.image)
            known = self._split_image_inputs(self._gallery_features) if reads else {}
            inputs = {name: values[feature_rows] for name, values in known.items()}
            images = self._encode_features(model, self._gallery_features.images[feature_rows], inputs)
            texts = self._encode_texts(model, [query], inputs=self._text_inputs([query]))
            sims = model.model.similarity(images, texts)[:, 0]  # (k,)
        else:
            feats, inputs = query
            self._check_image_dim(model, np.shape(feats)[-1])
            images = self._encode_features(model, np.asarray(feats, dtype=np.float32)[None],
                                           {name: np.asarray(v)[None] for name, v in inputs.items()})
            texts = self._encode_gallery_captions(model, rows)
            sims = model.model.similarity(images, texts)[0]  # (k,)
        return sims.double().cpu().tolist()

    def _encode_texts(self, model: LoadedModel, texts: list[str], *, inputs: dict[str, list] | None = None) -> Encoded:
        return encode_captions(model.model, [model.vocab.encode(t) for t in texts], device=self.device,
                               inputs=inputs)

    def _encode_gallery_captions(self, model: LoadedModel, rows: list[int]) -> Encoded:
        """The re-ranker's encoding of gallery captions: word ids and per-caption inputs from the dataset when it
        has them (`_dataset_caption_inputs`), else the vocabulary's ids and inputs derived from the index's texts."""
        texts, known = self.index.meta["texts"], self._caption_inputs
        tokens = ([known.token_ids[r] for r in rows] if known.token_ids is not None
                  else [model.vocab.encode(texts[r]) for r in rows])
        inputs = {name: [values[r] for r in rows] for name, values in known.captions.items()}
        if self._inputs is not None and set(self._inputs.caption) - set(inputs):
            inputs = self._text_inputs([texts[r] for r in rows]) | inputs
        return encode_captions(model.model, tokens, device=self.device, inputs=inputs)

    @torch.inference_mode()
    def _encode_features(self, model: LoadedModel, feats: np.ndarray,
                         inputs: dict[str, Any] | None = None) -> Encoded:
        self._check_image_dim(model, feats.shape[-1])
        images = torch.from_numpy(np.ascontiguousarray(feats)).float().to(self.device)
        extra = {name: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(self.device)
                 for name, v in (inputs or {}).items()}
        return model.model.encode_image(images, **extra).to("cpu")

    def _text_inputs(self, texts: list[str]) -> dict[str, list]:
        """The re-ranker's per-caption inputs derived from free texts (e.g. GSMN sparse: a dependency parse)."""
        if self._inputs is None or not self._inputs.caption:
            return {}
        with self._parser_lock:  # one parser, shared by the service's threads
            return self._inputs.for_texts(texts, parser=self._load_parser())

    def _load_parser(self) -> Any:
        if self._parser is None and self._inputs is not None:
            try:
                self._parser = self._inputs.load_parser()
            except DataError as err:
                raise GalleryIndexError(str(err)) from None
        return self._parser

    def _query_inputs(self, batch: np.ndarray, given: dict[str, Any]) -> dict[str, list]:
        """Per query image, the inputs the re-ranker reads besides its features (e.g. GSMN's boxes)."""
        if self._inputs is None or not self._inputs.image:
            return {}
        try:
            return self._inputs.for_image_query(batch, given)
        except DataError as err:
            raise GalleryIndexError(str(err)) from None

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

    def _split_image_inputs(self, split_data: PrecompSplit) -> dict[str, Any]:
        """The re-ranker's per-image inputs of a split (one row per feature row, e.g. GSMN's boxes, in evaluation's
        default geometry), read once per split."""
        key = (str(split_data.root.resolve()), split_data.split)
        if key not in self._image_inputs:
            assert self._inputs is not None and self.reranker is not None
            name = self.reranker.config.model.name
            try:
                found = self._inputs.for_split(split_data, captions=False).images
            except DataError as err:
                raise GalleryIndexError(f"{name} re-ranking reads per-image inputs: {err}") from None
            for input_name, values in found.items():
                if len(values) < len(split_data.images) or (
                        split_data.images.ndim == 3 and np.ndim(values) >= 2
                        and np.shape(values)[1] != split_data.images.shape[1]):
                    raise GalleryIndexError(f"{split_data.root}/{split_data.split}: {input_name} of shape "
                                            f"{np.shape(values)} for features of shape {split_data.images.shape}")
            self._image_inputs[key] = found
        return self._image_inputs[key]

    def _dataset_caption_inputs(self, reranker: LoadedModel) -> SplitInputs:
        """What the re-ranker reads per gallery caption from the dataset, as evaluation does (`Inputs.for_captions`:
        GSMN's dependency pairs and precaps word ids), when the dataset still holds the indexed captions; what it
        does not hold is derived from the captions' text per query."""
        if self._inputs is None or not (self._inputs.caption or self._inputs.pretokenized):
            return SplitInputs()
        texts = self.index.meta["texts"]
        try:
            found = self._inputs.for_captions(self._caption_root(), self.split, texts)
        except DataError as err:
            raise GalleryIndexError(f"{reranker.path}: {reranker.config.model.name} re-ranking of {self.where}: "
                                    f"{err}") from None
        if set(self._inputs.caption) - set(found.captions):
            _logger.info("%s: the dataset holds no %s for its captions; deriving them from the text", self.where,
                         ", ".join(sorted(set(self._inputs.caption) - set(found.captions))))
        return found

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
        expected = method_spec(model.config.model.name).feature_dim(model.config.model)
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
