"""The searches behind `itmatch serve`, without the web layer: `RetrievalService` wraps `itmatch.search.Searcher`.

An index of images answers text queries, an index of captions answers image queries (a dataset image by id, or an
uploaded `.npy` of its region features). Both may be served at once (`--index` twice); the dataset the indexes were
built from supplies the ground truth (a query typed exactly as one of the split's captions marks its images; a
dataset image marks its own captions), the thumbnails (`itmatch.serve.media`) and the region boxes. With a SCAN
re-ranker, `attention` returns which regions each word of a query attends to in one image. A GSMN re-ranker also
reads the boxes of the query image's regions: a dataset image brings its own, an upload has none and is answered
400 saying so. Every refusal is a `ServeError` checked against `ServeLimits` (`itmatch.serve.limits`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itmatch.data.precomp import PrecompSplit, resolve_root
from itmatch.data.tokenize import tokenize
from itmatch.errors import ItmatchError
from itmatch.registry import method_spec
from itmatch.search import Hit, Searcher
from itmatch.serve.limits import ServeError, ServeLimits, check_k, check_text, read_upload
from itmatch.serve.media import Pictures, open_boxes


def normalise_caption(text: str) -> str:
    """The form in which a typed query matches a dataset caption: tokens, lower case, trailing period dropped."""
    tokens = tokenize(text.lower())
    while tokens and tokens[-1] in (".", "!"):
        tokens.pop()
    return " ".join(tokens)


class RetrievalService:
    """The searches behind the API: text -> images, image -> captions, word -> region attention, thumbnails."""

    def __init__(self, searchers: Sequence[Searcher], *, limits: ServeLimits | None = None,
                 cache_dir: str | os.PathLike | None = None) -> None:
        self.limits = limits or ServeLimits()
        by_kind: dict[str, Searcher] = {}
        for searcher in searchers:
            if searcher.modality in by_kind:
                raise ItmatchError(f"two indexes of {searcher.modality} ({by_kind[searcher.modality].where}, "
                                   f"{searcher.where}); serve at most one index of images and one of captions")
            by_kind[searcher.modality] = searcher
        if not by_kind:
            raise ItmatchError("serve needs at least one index (--index DIR)")
        self.images, self.captions = by_kind.get("images"), by_kind.get("captions")
        first = self.images or self.captions
        assert first is not None
        if first.data_root is None:
            raise ItmatchError(f"{first.where}: the index records no dataset directory; pass --data DIR")
        self.split_name = first.split
        self.root = resolve_root(first.data_root, self.split_name)
        self.split = PrecompSplit(self.root, self.split_name)
        ids = self.split.ids or list(range(self.split.n_images))
        self.ids = ids
        self._row_of = {str(i): row for row, i in enumerate(ids)}
        self._images_of: dict[str, list[Any]] = {}
        for k, caption in enumerate(self.split.captions):
            owners = self._images_of.setdefault(normalise_caption(caption), [])
            image_id = ids[self.split.image_of(k)]
            if image_id not in owners:
                owners.append(image_id)
        self.pictures = Pictures(self.root, self.split_name, cache_dir=cache_dir)
        self._boxes = open_boxes(self.root, self.split_name, len(self.split.images))
        reranker = self.images.reranker if self.images is not None else None
        offers = reranker is not None and method_spec(reranker.config.model.name).attention is not None
        self.attention_model = reranker if offers else None

    @classmethod
    def open(cls, indexes: Sequence[str | os.PathLike], *, rerank: str | os.PathLike | None = None,
             candidates: int = 100, data: str | os.PathLike | None = None, device: str = "cpu",
             limits: ServeLimits | None = None, **kwargs: Any) -> RetrievalService:
        searchers = [Searcher.open(ix, rerank=rerank, candidates=candidates, data=data, device=device, **kwargs)
                     for ix in indexes]
        return cls(searchers, limits=limits)

    def close(self) -> None:
        self.pictures.close()

    # -------------------------------------------------------------------------------------------- dataset
    def row(self, image_id: str) -> int:
        """Feature row of a gallery image id; 404 for an id the dataset split does not have."""
        row = self._row_of.get(str(image_id).strip())
        if row is None:
            shown = str(image_id)[:40]
            raise ServeError(404, f"unknown image id {shown!r}: not an image of the {self.split_name} split "
                                  f"({len(self.ids)} images, ids {self.ids[0]}..{self.ids[-1]})")
        return row

    def ground_truth(self, text: str) -> list[Any] | None:
        """Images whose captions include `text` (after `normalise_caption`); None if it is no dataset caption."""
        return self._images_of.get(normalise_caption(text))

    def has_thumbnails(self) -> bool:
        return self.pictures.available()

    def thumbnail(self, image_id: str) -> Path:
        """A PNG file showing a gallery image (drawn or downscaled into the cache on first request)."""
        return self.pictures.thumbnail(str(self.ids[self.row(image_id)]))  # only gallery ids reach the file system

    def image_size(self, key: str) -> list[int] | None:
        """(width, height) in the pixels the boxes are given in: the picture file's, or the synthetic canvas."""
        return self.pictures.image_size(key)

    # -------------------------------------------------------------------------------------------- queries
    def info(self) -> dict[str, Any]:
        """What is served; directories by their name only (no absolute path of the server's disk is shown)."""

        def describe(s: Searcher | None) -> dict[str, Any] | None:
            if s is None:
                return None
            return {"index": Path(s.where).name, "size": len(s.index), "kind": s.index.spec.kind,
                    "model": s.index.meta["model"]["name"],
                    "rerank": s.reranker.config.model.name if s.reranker is not None else None,
                    "candidates": s.candidates if s.reranker is not None else None}

        step = max(1, self.split.n_captions // 8)
        return {"images": describe(self.images), "captions": describe(self.captions),
                "data": {"root": self.root.name, "split": self.split_name, "n_images": self.split.n_images,
                         "n_captions": self.split.n_captions},
                "thumbnails": self.has_thumbnails(), "attention": self.attention_model is not None,
                "examples": [self.split.captions[k] for k in range(0, self.split.n_captions, step)][:8],
                "limits": asdict(self.limits)}

    def search_text(self, text: str, k: int) -> dict[str, Any]:
        if self.images is None:
            raise ServeError(400, "text queries need an index of images; start the server with one "
                                  "(`itmatch index build CKPT --gallery images ...`)")
        text = self._check_text(text)
        truth = self.ground_truth(text)
        hits = self.images.search_text(text, k=self._check_k(k))[0]
        marked = set(map(str, truth or []))
        return {"query": text, "ground_truth": truth,
                "hits": [self._hit(h, ground_truth=str(h.id) in marked) for h in hits]}

    def search_image_id(self, image_id: str, k: int) -> dict[str, Any]:
        searcher = self._caption_searcher()
        row = self.row(image_id)
        key = self.ids[row]
        feats = np.asarray(self.split.images[row], dtype=np.float32)
        inputs = searcher.image_inputs(key, data=self.root, split=self.split_name)  # a GSMN re-ranker's boxes
        hits = searcher.search_image(feats, k=self._check_k(k), **inputs)[0]
        return {"query": {"id": key}, "ground_truth": [key],
                "hits": [self._hit(h, ground_truth=str(h.image_id) == str(key)) for h in hits]}

    def search_image_upload(self, body: bytes, k: int) -> dict[str, Any]:
        searcher = self._caption_searcher()
        feats = self.parse_features(body)
        hits = searcher.search_image(feats, k=self._check_k(k))[0]
        return {"query": {"upload": list(feats.shape)}, "ground_truth": None,
                "hits": [self._hit(h, ground_truth=False) for h in hits]}

    def image_record(self, image_id: str) -> dict[str, Any]:
        row = self.row(image_id)
        key = self.ids[row]
        first = row * self.split.im_div
        return {"id": key, "captions": self.split.captions[first : first + self.split.im_div],
                "thumbnail": f"/api/images/{key}/thumbnail" if self.has_thumbnails() else None}

    @torch.inference_mode()
    def attention(self, image_id: str, text: str) -> dict[str, Any]:
        """Word -> region attention of the re-ranker (a method offering `attention`, e.g. SCAN) for (gallery image,
        query), with the region boxes."""
        if self.attention_model is None:
            raise ServeError(400, "no attention to show: start the server with --rerank CKPT of a SCAN model")
        if self._boxes is None:
            raise ServeError(400, f"no region boxes in the dataset {self.root.name} ({self.split_name}_boxes.npy or "
                                  f"{self.split_name}_ims_bbx.npy) to draw the attention on")
        text = self._check_text(text)
        row = self.row(image_id)
        loaded = self.attention_model
        tokens = loaded.vocab.encode(text)
        feats = torch.from_numpy(np.asarray(self.split.images[row], dtype=np.float32))[None]
        attention = method_spec(loaded.config.model.name).attention
        assert attention is not None
        maps = attention(loaded.model, feats, torch.tensor([tokens]), torch.tensor([len(tokens)]))
        weights = maps["weights"]  # (L, R)
        labels = ["<start>", *tokenize(text.lower()), "<end>"]
        if len(labels) != len(tokens):  # a tokenizer that is not the word vocabulary: number the positions
            labels = [f"#{i}" for i in range(len(tokens))]
        score = float(loaded.model.similarity(loaded.model.encode_image(feats),
                                              loaded.model.encode_text(torch.tensor([tokens]),
                                                                       torch.tensor([len(tokens)])))[0, 0])
        return {"id": self.ids[row], "query": text, "direction": maps["direction"], "score": score,
                "image_size": self.image_size(str(self.ids[row])), "words": labels,
                "boxes": np.asarray(self._boxes[row], dtype=float).round(1).tolist(),
                "weights": weights.float().numpy().round(5).tolist()}

    def parse_features(self, body: bytes) -> np.ndarray:
        """An uploaded `.npy` of one image's region features, checked against the caption index's model."""
        searcher = self._caption_searcher()
        shape = searcher.index.meta.get("data", {}).get("image_shape") or [None, self.split.feature_dim]
        return read_upload(body, self.limits, shape)

    # -------------------------------------------------------------------------------------------- helpers
    def _caption_searcher(self) -> Searcher:
        if self.captions is None:
            raise ServeError(400, "image queries need an index of captions; start the server with one "
                                  "(`itmatch index build CKPT --gallery captions ...`, then --index it as well)")
        return self.captions

    def _check_text(self, text: str) -> str:
        return check_text(text, self.limits)

    def _check_k(self, k: int) -> int:
        return check_k(k, self.limits)

    def _hit(self, hit: Hit, *, ground_truth: bool) -> dict[str, Any]:
        out = {"rank": hit.rank, "score": round(hit.score, 6), "id": hit.id, "ground_truth": ground_truth}
        if hit.first_score is not None:
            out["first_score"] = round(hit.first_score, 6)
        if hit.text is not None:
            out |= {"text": hit.text, "image_id": hit.image_id}
        elif self.has_thumbnails():
            out["thumbnail"] = f"/api/images/{hit.id}/thumbnail"
        return out
