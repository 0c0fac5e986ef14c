"""The web layer of `itmatch serve`: the FastAPI app (JSON API under /api, the page at /, API docs at /docs rendered
from /openapi.json by a self-contained page, which works offline) over a `RetrievalService`, run under uvicorn.

Concurrency: searches run in worker threads, at most `max_running` at once; up to `max_waiting` more wait; beyond
that the answer is 503 with Retry-After (`Gate`). uvicorn's `limit_concurrency` bounds open connections as well;
connections still sending their request head are timed out and capped per client (`itmatch.serve.protocol`), so
slow clients cannot exhaust it.

Refusals are JSON `{"detail": "one line"}`: a query `itmatch.validate` refuses is 422 (the same message the CLI
prints), a `ServeError` its own status. Bound to a loopback address the server answers only requests whose Host is
localhost, 127.0.0.1 or [::1] (any port): a web page whose domain re-resolves to 127.0.0.1 (DNS rebinding) gets 400.
"""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import Any

from itmatch.errors import ItmatchError, QueryError
from itmatch.serve.limits import Gate, ServeError
from itmatch.serve.service import RetrievalService

try:  # optional (`itmatch[serve]`); imported here because the endpoints' annotations name these types
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from starlette.requests import ClientDisconnect
except ImportError:  # pragma: no cover - the service class works without them
    FastAPI = None  # type: ignore[assignment,misc]

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def page_html() -> str:
    return resources.files("itmatch.serve").joinpath("page.html").read_text(encoding="utf-8")


def docs_html() -> str:
    return resources.files("itmatch.serve").joinpath("docs.html").read_text(encoding="utf-8")


def is_loopback(host: str) -> bool:
    """Whether a bind address only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str | None:
    """The host name of a Host header ('localhost:8000' -> 'localhost', '[::1]:80' -> '::1'); None if malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        name, sep, rest = header[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None if not rest else "x"
    else:
        name, sep, port = header.partition(":")
        port = port if sep else None
        sep = "]"
    if not name or not sep or (port is not None and not (port.isdigit() and len(port) <= 5)):
        return None
    return name


class HostCheck:
    """ASGI middleware: refuse (400, one JSON detail) a request whose Host header names none of `allowed`."""

    def __init__(self, app: Any, allowed: frozenset[str]) -> None:
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
            if header is None or host_name(header) not in self.allowed:
                shown = "no Host header" if header is None else f"Host {header[:80]!r}"
                names = ", ".join(sorted(self.allowed))
                detail = (f"{shown} is not served: this server is bound to a loopback address and answers only "
                          f"{names} (DNS rebinding protection); bind to 0.0.0.0 to serve other names")
                await JSONResponse({"detail": detail}, status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(service: RetrievalService, *, allowed_hosts: frozenset[str] | set[str] | None = None) -> Any:
    """The FastAPI application: JSON API under /api, the page at /, API docs at /docs (offline: no CDN).

    `allowed_hosts`: the host names a request's Host header may name (any port); None accepts every Host."""
    if FastAPI is None:
        raise ItmatchError("`itmatch serve` needs FastAPI and uvicorn: pip install 'itmatch[serve]'")
    limits = service.limits
    gate = Gate(limits.max_running, limits.max_waiting)
    app = FastAPI(title="itmatch retrieval", version="1", docs_url=None, redoc_url=None,
                  description="Text -> image and image -> text search over an itmatch gallery index.")
    app.state.service, app.state.gate = service, gate
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=frozenset(h.lower().strip("[]") for h in allowed_hosts))

    @app.exception_handler(QueryError)
    async def _query_error(request: Request, err: QueryError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=422)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, err: ClientDisconnect) -> Response:
        return Response(status_code=400)  # nobody reads it (uvicorn drops it); no traceback in the log

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

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs() -> str:
        return docs_html()

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
        try:
            async with asyncio.timeout(limits.body_timeout_s):
                async for chunk in request.stream():  # also bounds chunked uploads that declare no length
                    body += chunk
                    if len(body) > limits.max_upload_bytes:
                        raise ServeError(413, f"upload exceeds the limit of {limits.max_upload_bytes} bytes")
        except TimeoutError:
            raise ServeError(408, f"upload not complete within {limits.body_timeout_s:g} s "
                                  f"({len(body)} bytes received)") from None
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


def serve(service: RetrievalService, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
          allowed_hosts: frozenset[str] | set[str] | None = None) -> None:
    """Run the app under uvicorn until interrupted.

    On a loopback `host` only requests naming localhost, 127.0.0.1 or [::1] (plus `allowed_hosts`) are answered;
    on any other address every Host is, unless `allowed_hosts` is given. Connections still sending their request
    head are timed out and capped per client (`itmatch.serve.protocol`)."""
    try:
        import uvicorn

        from itmatch.serve.protocol import guarded_protocol
    except ImportError:
        raise ItmatchError("`itmatch serve` needs FastAPI and uvicorn: pip install 'itmatch[serve]'") from None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ItmatchError(f"port must be between 0 and 65535, got {port!r}")
    if is_loopback(host):
        allowed = LOOPBACK_HOSTS | set(allowed_hosts or ())
    else:
        allowed = None if allowed_hosts is None else set(allowed_hosts)
    app = create_app(service, allowed_hosts=allowed)
    limits = service.limits
    protocol = guarded_protocol(header_timeout=limits.header_timeout_s, max_incomplete=limits.max_incomplete,
                                max_incomplete_per_client=limits.max_incomplete_per_client)
    # connections still sending their head are at most max_incomplete: they never exhaust limit_concurrency
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol,
                            limit_concurrency=4 * (limits.max_running + limits.max_waiting) + limits.max_incomplete)
    try:
        uvicorn.Server(config).run()
    finally:
        service.close()
