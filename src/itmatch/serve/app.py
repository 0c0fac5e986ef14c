"""The web layer of `itmatch serve`: the FastAPI app (JSON API under /api, the page at /, OpenAPI docs at /docs) over
a `RetrievalService`, run under uvicorn.

Concurrency: searches run in worker threads, at most `max_running` at once; up to `max_waiting` more wait; beyond
that the answer is 503 with Retry-After (`Gate`). uvicorn's `limit_concurrency` bounds open connections as well.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from itmatch.errors import ItmatchError
from itmatch.serve.limits import Gate, ServeError
from itmatch.serve.service import RetrievalService

try:  # optional (`itmatch[serve]`); imported here because the endpoints' annotations name these types
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
except ImportError:  # pragma: no cover - the service class works without them
    FastAPI = None  # type: ignore[assignment,misc]


def page_html() -> str:
    return resources.files("itmatch.serve").joinpath("page.html").read_text(encoding="utf-8")


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
