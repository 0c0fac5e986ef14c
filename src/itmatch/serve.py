"""`itmatch serve`: a retrieval web page and JSON API over one or two gallery indexes (FastAPI + uvicorn).

The service wraps `itmatch.search.Searcher`: an index of images answers text queries, an index of captions answers
image queries (a dataset image by id, or an uploaded `.npy` of its region features). Both may be served at once
(`--index` twice); the dataset the indexes were built from supplies the ground truth (a query typed exactly as one
of the split's captions marks its images; a dataset image marks its own captions), the thumbnails and the region
boxes. With a SCAN re-ranker, `/api/attention` returns which regions each word of a query attends to in one image,
which the page draws over the thumbnail.

Uploads are region features, not picture files: the indexed models read detector features (`{split}_ims.npy`
rows), so an "image" query is an (R, D) array saved with `numpy.save`. Picture files are refused with 415 and a
message saying so. A GSMN re-ranker also reads the boxes of the query image's regions: a dataset image brings its
own, an upload has none and is answered 400 saying so. Every limit (query length, k, upload bytes, regions) is a
`ServeLimits` field; a request over one is a 4xx whose JSON `detail` is one line.

Thumbnails: the gallery's own picture files when it has them (`id_mapping.json` or `images/ID.png|jpg`), else the
synthetic dataset's scenes drawn from `scenes.jsonl` on first request (cached in a temporary directory). Only ids
of the gallery are looked up, and a resolved file must lie inside the image directory (no path traversal).

Concurrency: searches run in worker threads, at most `max_running` at once; up to `max_waiting` more wait; beyond
that the answer is 503 with Retry-After. uvicorn's `limit_concurrency` bounds open connections as well.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itmatch.data.precomp import PrecompSplit, resolve_root
from itmatch.data.tokenize import tokenize
from itmatch.errors import ItmatchError
from itmatch.registry import method_spec
from itmatch.search import Hit, Searcher

try:  # optional (`itmatch[serve]`); imported here because the endpoints' annotations name these types
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
except ImportError:  # pragma: no cover - the service class works without them
    FastAPI = None  # type: ignore[assignment,misc]

_logger = logging.getLogger(__name__)

IMAGE_DIR_NAMES = ("images", "flickr30k-images")
_PICTURE_MAGIC = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"RIFF": "WebP", b"BM": "BMP"}
_NPY_MAGIC = b"\x93NUMPY"
_THUMB_SIDE = 384


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
        self.image_dir = next((self.root / n for n in IMAGE_DIR_NAMES if (self.root / n).is_dir()), None)
        self._mapping = self._read_id_mapping()
        self._scenes = self._read_scenes()
        self._boxes = self._open_boxes()
        self._tmp = None if cache_dir else tempfile.TemporaryDirectory(prefix="itmatch-serve-")
        self.cache_dir = Path(cache_dir) if cache_dir else Path(self._tmp.name)  # type: ignore[union-attr]
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._render_lock = threading.Lock()
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
        if self._tmp is not None:
            self._tmp.cleanup()

    # -------------------------------------------------------------------------------------------- dataset
    def _read_id_mapping(self) -> dict[str, str]:
        path = self.root / "id_mapping.json"
        if not path.is_file():
            return {}
        try:
            mapping = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ItmatchError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(mapping, dict):
            raise ItmatchError(f"{path}: expected an object mapping image ids to file names")
        return {str(k): str(v) for k, v in mapping.items()}

    def _read_scenes(self) -> dict[str, list[dict]]:
        path = self.root / "scenes.jsonl"
        scenes: dict[str, list[dict]] = {}
        if path.is_file():
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    record = json.loads(line)
                    if record.get("split") == self.split_name:
                        scenes[str(record["id"])] = record["objects"]
        return scenes

    def _open_boxes(self) -> np.ndarray | None:
        for name in (f"{self.split_name}_boxes.npy", f"{self.split_name}_ims_bbx.npy"):
            if (self.root / name).is_file():
                boxes = np.load(self.root / name, mmap_mode="r", allow_pickle=False)
                if boxes.ndim == 3 and boxes.shape[0] == len(self.split.images) and boxes.shape[2] == 4:
                    return boxes
        return None

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
        return self.image_dir is not None or bool(self._scenes)

    def thumbnail(self, image_id: str) -> Path:
        """A PNG/JPEG file showing a gallery image (drawn or downscaled into the cache on first request)."""
        key = str(self.ids[self.row(image_id)])  # only gallery ids reach the file system
        cached = self.cache_dir / f"{key}.png"
        if cached.is_file():
            return cached
        source = self._picture_file(key)
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
        source = self._picture_file(key)
        if source is not None:
            from PIL import Image

            with Image.open(source) as im:  # reads the header only
                return list(im.size)
        if key in self._scenes:
            from itmatch.data.synthetic import CANVAS_H, CANVAS_W

            return [CANVAS_W, CANVAS_H]
        return None

    def _picture_file(self, key: str) -> Path | None:
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

    # -------------------------------------------------------------------------------------------- queries
    def info(self) -> dict[str, Any]:
        def describe(s: Searcher | None) -> dict[str, Any] | None:
            if s is None:
                return None
            return {"index": s.where, "size": len(s.index), "kind": s.index.spec.kind,
                    "model": s.index.meta["model"]["name"],
                    "rerank": s.reranker.config.model.name if s.reranker is not None else None,
                    "candidates": s.candidates if s.reranker is not None else None}

        step = max(1, self.split.n_captions // 8)
        return {"images": describe(self.images), "captions": describe(self.captions),
                "data": {"root": str(self.root), "split": self.split_name, "n_images": self.split.n_images,
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
            raise ServeError(400, f"no region boxes in {self.root} ({self.split_name}_boxes.npy or "
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
        import io

        if len(body) > self.limits.max_upload_bytes:
            raise ServeError(413, f"upload is {len(body)} bytes; the limit is {self.limits.max_upload_bytes}")
        if not body:
            raise ServeError(400, "empty upload: send one image's region features as a .npy file")
        for magic, kind in _PICTURE_MAGIC.items():
            if body.startswith(magic):
                raise ServeError(415, f"a {kind} picture was uploaded, but this gallery's model reads region "
                                      "features: upload a .npy of shape (regions, dim) (numpy.save)")
        if not body.startswith(_NPY_MAGIC):
            raise ServeError(415, "not a .npy file: upload one image's region features saved with numpy.save")
        try:
            feats = np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise ServeError(400, f"unreadable .npy upload ({str(err).splitlines()[0][:160]})") from None
        searcher = self._caption_searcher()
        shape = searcher.index.meta.get("data", {}).get("image_shape") or [None, self.split.feature_dim]
        dim = shape[-1]
        if feats.dtype.kind not in "fiu":
            raise ServeError(422, f"features must be numbers, got dtype {feats.dtype}")
        if feats.ndim != len(shape) or feats.shape[-1] != dim:
            want = f"(regions, {dim})" if len(shape) == 2 else f"({dim},)"
            raise ServeError(422, f"features have shape {feats.shape}; this index's model reads {want}")
        if feats.ndim == 2 and not 1 <= feats.shape[0] <= self.limits.max_regions:
            raise ServeError(422, f"{feats.shape[0]} regions; between 1 and {self.limits.max_regions} are accepted")
        feats = feats.astype(np.float32)
        if not np.isfinite(feats).all():
            raise ServeError(422, "features contain NaN or infinity")
        return feats

    # -------------------------------------------------------------------------------------------- helpers
    def _caption_searcher(self) -> Searcher:
        if self.captions is None:
            raise ServeError(400, "image queries need an index of captions; start the server with one "
                                  "(`itmatch index build CKPT --gallery captions ...`, then --index it as well)")
        return self.captions

    def _check_text(self, text: str) -> str:
        text = re.sub(r"\s+", " ", text).strip()
        if not text:
            raise ServeError(422, "empty query: type a sentence")
        if len(text) > self.limits.max_query_chars:
            raise ServeError(422, f"query is {len(text)} characters; the limit is {self.limits.max_query_chars}")
        return text

    def _check_k(self, k: int) -> int:
        if not 1 <= k <= self.limits.max_k:
            raise ServeError(422, f"k must be between 1 and {self.limits.max_k}, got {k}")
        return k

    def _hit(self, hit: Hit, *, ground_truth: bool) -> dict[str, Any]:
        out = {"rank": hit.rank, "score": round(hit.score, 6), "id": hit.id, "ground_truth": ground_truth}
        if hit.first_score is not None:
            out["first_score"] = round(hit.first_score, 6)
        if hit.text is not None:
            out |= {"text": hit.text, "image_id": hit.image_id}
        elif self.has_thumbnails():
            out["thumbnail"] = f"/api/images/{hit.id}/thumbnail"
        return out


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


def page_html() -> str:
    return resources.files("itmatch").joinpath("serve_page.html").read_text(encoding="utf-8")


def create_app(service: RetrievalService) -> Any:
    """The FastAPI application: JSON API under /api, the page at /, OpenAPI docs at /docs."""
    if FastAPI is None:
        raise ItmatchError("`itmatch serve` needs FastAPI and uvicorn: pip install 'itmatch[serve]'")
    limits = service.limits
    gate = Gate(limits.max_running, limits.max_waiting)
    app = FastAPI(title="itmatch retrieval", version="1",
                  description="Text -> image and image -> text search over an itmatch gallery index.")
    app.state.service, app.state.gate = service, gate

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, err: ServeError) -> JSONResponse:
        headers = {"Retry-After": "1"} if err.status == 503 else None
        return JSONResponse({"detail": str(err)}, status_code=err.status, headers=headers)

    @app.exception_handler(ItmatchError)
    async def _itmatch_error(request: Request, err: ItmatchError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        parts = []
        for e in err.errors():
            where = ".".join(str(x) for x in e.get("loc", ())[1:]) or "request"
            parts.append(f"{where}: {e.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)

    k_param = Query(10, ge=1, le=limits.max_k, description="number of results")
    q_param = Query(..., min_length=1, max_length=limits.max_query_chars, description="the sentence to search for")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return page_html()

    @app.get("/api/health", summary="liveness")
    def health() -> dict[str, Any]:
        return {"status": "ok", "running_or_queued": gate.pending}

    @app.get("/api/info", summary="indexes, models, dataset, limits and example queries")
    def info() -> dict[str, Any]:
        return service.info()

    @app.get("/api/search/text", summary="text -> images")
    async def search_text(q: str = q_param, k: int = k_param) -> dict[str, Any]:
        return await gate.run(service.search_text, q, k)

    @app.get("/api/search/image", summary="image (a gallery id) -> captions")
    async def search_image(id: str = Query(..., min_length=1, max_length=64, description="dataset image id"),  # noqa: A002
                           k: int = k_param) -> dict[str, Any]:
        return await gate.run(service.search_image_id, id, k)

    @app.post("/api/search/image", summary="image (uploaded region features, .npy body) -> captions",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def search_image_upload(request: Request, k: int = k_param) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_upload_bytes:
            raise ServeError(413, f"upload is {declared} bytes; the limit is {limits.max_upload_bytes}")
        body = bytearray()
        async for chunk in request.stream():  # also bounds chunked uploads that declare no length
            body += chunk
            if len(body) > limits.max_upload_bytes:
                raise ServeError(413, f"upload exceeds the limit of {limits.max_upload_bytes} bytes")
        return await gate.run(service.search_image_upload, bytes(body), k)

    @app.get("/api/images/{image_id}", summary="a gallery image: its captions (ground truth) and thumbnail")
    def image(image_id: str) -> dict[str, Any]:
        return service.image_record(image_id)

    @app.get("/api/images/{image_id}/thumbnail", summary="a gallery image as a picture",
             response_class=FileResponse)
    async def thumbnail(image_id: str) -> FileResponse:
        path = await gate.run(service.thumbnail, image_id)
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/attention", summary="word -> region attention of the SCAN re-ranker for one image and query")
    async def attention(id: str = Query(..., min_length=1, max_length=64), q: str = q_param) -> dict[str, Any]:  # noqa: A002
        return await gate.run(service.attention, id, q)

    return app


def serve(service: RetrievalService, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Run the app under uvicorn until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise ItmatchError("`itmatch serve` needs FastAPI and uvicorn: pip install 'itmatch[serve]'") from None
    app = create_app(service)
    limits = service.limits
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level,
                    limit_concurrency=4 * (limits.max_running + limits.max_waiting))
    finally:
        service.close()
