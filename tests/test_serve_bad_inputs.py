"""Bad inputs to every endpoint of `itmatch serve` and to `itmatch search` (issue 18), table-driven.

Each HTTP case asserts the 4xx status, a JSON body that is exactly `{"detail": "one line"}` naming the problem, and no
log record with a traceback; each CLI case exit code 2, exactly one `itmatch: error:` line on stderr, no traceback,
and the index files byte-identical afterwards. The server's app runs with the Host check of a loopback bind (the
requests name `localhost`), as `itmatch serve` does by default.
"""

from __future__ import annotations

import hashlib
import io
import logging
import struct
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from itmatch.data.precomp import PrecompSplit  # noqa: E402
from itmatch.errors import QueryError  # noqa: E402
from itmatch.search import build_index  # noqa: E402
from itmatch.serve import RetrievalService, ServeLimits, create_app  # noqa: E402
from itmatch.serve.app import LOOPBACK_HOSTS, host_name  # noqa: E402
from itmatch.validate import check_boxes, check_features, check_k, check_text  # noqa: E402
from tests.test_cli import run_cli  # noqa: E402
from tests.test_index import save_model  # noqa: E402

LIMIT = 1 << 16  # the upload limit of these tests' server (64 KiB)
DIM = 32  # the synthetic dataset's feature size


@pytest.fixture(scope="module")
def site(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve_bad")
    vsepp = save_model(root / "vsepp.pt", synth_data)
    scan = save_model(root / "scan.pt", synth_data, "scan", cross_attn="t2i", agg_func="Mean")
    build_index(vsepp, synth_data, gallery="images", out=root / "images")
    build_index(vsepp, synth_data, gallery="captions", out=root / "captions")
    return {"images": root / "images", "captions": root / "captions", "scan": scan, "root": root}


@pytest.fixture(scope="module")
def clients(site: dict[str, Path]) -> dict[str, TestClient]:
    """'plain': both indexes; 'scan': the image index re-ranked by SCAN (the attention endpoint)."""
    plain = RetrievalService.open([site["images"], site["captions"]], limits=ServeLimits(max_upload_bytes=LIMIT))
    scan = RetrievalService.open([site["images"]], rerank=site["scan"], candidates=10)
    out = {name: TestClient(create_app(svc, allowed_hosts=LOOPBACK_HOSTS), base_url="http://localhost:8000",
                            raise_server_exceptions=False) for name, svc in (("plain", plain), ("scan", scan))}
    yield out
    plain.close()
    scan.close()


def npy(array: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=True, **kwargs)
    return buf.getvalue()


def npy_header(shape: tuple, descr: str = "<f4", *, raw: str | None = None, version: int = 1) -> bytes:
    """A `.npy` header (format `version`.0) declaring `shape` (or holding `raw` as its dictionary), without data."""
    text = raw if raw is not None else repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    prefix = 10 if version == 1 else 12
    text += " " * ((64 - (prefix + len(text) + 1) % 64) % 64) + "\n"
    length = struct.pack("<H" if version == 1 else "<I", len(text))
    return b"\x93NUMPY" + bytes([version, 0]) + length + text.encode("latin-1")


FEATS = np.random.default_rng(0).random((36, DIM), dtype=np.float32)
NAN, INF = FEATS.copy(), FEATS.copy()
NAN[3, 4], INF[0, 0] = np.nan, -np.inf
LONG = "a" * 501
PNG = b"\x89PNG\r\n\x1a\n" + b"0" * 100

# (id, client, method, url, body, headers, status, message)
CASES = [
    # ---- GET /api/search/text: query string and k
    ("text-no-q", "plain", "GET", "/api/search/text?k=5", None, {}, 422, "q: Field required"),
    ("text-empty-q", "plain", "GET", "/api/search/text?q=&k=5", None, {}, 422, "at least 1 character"),
    ("text-blank-q", "plain", "GET", "/api/search/text?q=%20%09%0A", None, {}, 422, "empty query"),
    ("text-long-q", "plain", "GET", f"/api/search/text?q={LONG}", None, {}, 422, "at most 500 characters"),
    ("text-long-after-spaces", "plain", "GET", f"/api/search/text?q=%20{'ab%20' * 170}", None, {}, 422,
     "at most 500 characters"),
    ("text-nul", "plain", "GET", "/api/search/text?q=red%00cube", None, {}, 422, "control character"),
    ("text-escape", "plain", "GET", "/api/search/text?q=red%1B[31mcube", None, {}, 422, "control character"),
    ("text-k0", "plain", "GET", "/api/search/text?q=cube&k=0", None, {}, 422, "greater than or equal to 1"),
    ("text-k-negative", "plain", "GET", "/api/search/text?q=cube&k=-3", None, {}, 422, "greater than or equal to 1"),
    ("text-k101", "plain", "GET", "/api/search/text?q=cube&k=101", None, {}, 422, "less than or equal to 100"),
    ("text-k-huge", "plain", "GET", f"/api/search/text?q=cube&k={10 ** 30}", None, {}, 422, "less than or equal"),
    ("text-k-word", "plain", "GET", "/api/search/text?q=cube&k=ten", None, {}, 422, "valid integer"),
    ("text-k-float", "plain", "GET", "/api/search/text?q=cube&k=1.5", None, {}, 422, "valid integer"),
    ("text-k-exp", "plain", "GET", "/api/search/text?q=cube&k=1e3", None, {}, 422, "valid integer"),
    ("text-k-empty", "plain", "GET", "/api/search/text?q=cube&k=", None, {}, 422, "valid integer"),
    ("text-k-nan", "plain", "GET", "/api/search/text?q=cube&k=nan", None, {}, 422, "valid integer"),
    # ---- GET /api/search/image: ids
    ("image-no-id", "plain", "GET", "/api/search/image", None, {}, 422, "id: Field required"),
    ("image-empty-id", "plain", "GET", "/api/search/image?id=", None, {}, 422, "at least 1 character"),
    ("image-unknown-id", "plain", "GET", "/api/search/image?id=12345", None, {}, 404, "unknown image id '12345'"),
    ("image-traversal-id", "plain", "GET", "/api/search/image?id=%2E%2E%2Fetc", None, {}, 404, "unknown image id"),
    ("image-long-id", "plain", "GET", f"/api/search/image?id={'9' * 65}", None, {}, 422, "at most 64 characters"),
    ("image-nul-id", "plain", "GET", "/api/search/image?id=%00", None, {}, 404, "unknown image id"),
    ("image-k0", "plain", "GET", "/api/search/image?id=3000000&k=0", None, {}, 422, "greater than or equal to 1"),
    # ---- POST /api/search/image: uploads
    ("upload-empty", "plain", "POST", "/api/search/image", b"", {}, 400, "empty upload"),
    ("upload-png", "plain", "POST", "/api/search/image", PNG, {"content-type": "image/png"}, 415, "PNG picture"),
    ("upload-jpeg", "plain", "POST", "/api/search/image", b"\xff\xd8\xff\xe0" + b"0" * 100, {}, 415, "JPEG picture"),
    ("upload-gif", "plain", "POST", "/api/search/image", b"GIF89a" + b"0" * 100, {}, 415, "GIF picture"),
    ("upload-text", "plain", "POST", "/api/search/image", b"hello world", {}, 415, "not a .npy file"),
    ("upload-json", "plain", "POST", "/api/search/image", b'{"features": [[1, 2]]}',
     {"content-type": "application/json"}, 415, "not a .npy file"),
    ("upload-npz", "plain", "POST", "/api/search/image", b"PK\x03\x04" + b"0" * 100, {}, 415, "not a .npy file"),
    ("upload-pickle", "plain", "POST", "/api/search/image", npy(np.array([{"a": 1}], dtype=object)), {}, 422,
     "pickled objects are never loaded"),
    ("upload-truncated-header", "plain", "POST", "/api/search/image", npy(FEATS)[:100], {}, 400,
     "unreadable .npy upload"),
    ("upload-truncated-data", "plain", "POST", "/api/search/image", npy(FEATS)[:-8], {}, 400,
     "4608 bytes of data, but 4600 follow"),
    ("upload-padded", "plain", "POST", "/api/search/image", npy(FEATS) + b"\0" * 8, {}, 400, "truncated or padded"),
    ("upload-huge-header", "plain", "POST", "/api/search/image", npy_header((10 ** 8, 256)), {}, 413,
     "declares shape (100000000, 256) of float32 (102400000000 bytes); the limit is 65536"),
    ("upload-huge-header-dim-ok", "plain", "POST", "/api/search/image", npy_header((10 ** 12, DIM)), {}, 413,
     "declares shape (1000000000000, 32)"),
    ("upload-huge-header-3d", "plain", "POST", "/api/search/image", npy_header((10 ** 6, 10 ** 6, 10 ** 6)), {},
     413, "the limit is 65536"),
    ("upload-negative-shape", "plain", "POST", "/api/search/image", npy_header((-1, DIM)), {}, 400,
     "unreadable .npy upload"),
    ("upload-header-code", "plain", "POST", "/api/search/image", npy_header((), raw="__import__('os')"), {}, 400,
     "unreadable .npy upload"),
    ("upload-header-not-dict", "plain", "POST", "/api/search/image", npy_header((), raw="[1, 2, 3]"), {}, 400,
     "unreadable .npy upload"),
    ("upload-huge-header-v2", "plain", "POST", "/api/search/image", npy_header((10 ** 8, 256), version=2), {}, 413,
     "declares shape (100000000, 256)"),
    ("upload-version-9", "plain", "POST", "/api/search/image", npy_header((36, DIM), version=9), {}, 415,
     "format version 9.0"),
    ("upload-nan", "plain", "POST", "/api/search/image", npy(NAN), {}, 422, "NaN or infinity"),
    ("upload-inf", "plain", "POST", "/api/search/image", npy(INF), {}, 422, "NaN or infinity"),
    ("upload-overflow", "plain", "POST", "/api/search/image", npy(FEATS.astype(np.float64) * 1e300), {}, 422,
     "too large for float32"),
    ("upload-complex", "plain", "POST", "/api/search/image", npy(FEATS.astype(np.complex64)), {}, 422,
     "got dtype complex64"),
    ("upload-bool", "plain", "POST", "/api/search/image", npy(FEATS > 0.5), {}, 422, "got dtype bool"),
    ("upload-strings", "plain", "POST", "/api/search/image", npy(np.array([["x"] * DIM] * 36)), {}, 422,
     "features must be numbers"),
    ("upload-structured", "plain", "POST", "/api/search/image",
     npy(np.zeros((36, DIM), dtype=[("a", "<f4")])), {}, 422, "features must be numbers"),
    ("upload-datetime", "plain", "POST", "/api/search/image", npy(np.zeros((36, DIM), "datetime64[s]")), {}, 422,
     "features must be numbers"),
    ("upload-zero-regions", "plain", "POST", "/api/search/image", npy(np.zeros((0, DIM), np.float32)), {}, 422,
     "0 regions"),
    ("upload-wrong-dim", "plain", "POST", "/api/search/image", npy(FEATS[:, :31]), {}, 422,
     "this index's model reads (regions, 32)"),
    ("upload-3d", "plain", "POST", "/api/search/image", npy(FEATS[None]), {}, 422, "shape (1, 36, 32)"),
    ("upload-1d", "plain", "POST", "/api/search/image", npy(FEATS[0]), {}, 422, "shape (32,)"),
    ("upload-scalar", "plain", "POST", "/api/search/image", npy(np.float32(1)), {}, 422, "shape ()"),
    ("upload-too-many-regions", "plain", "POST", "/api/search/image", npy(np.zeros((1025, DIM), np.int8)), {}, 422,
     "1025 regions; between 1 and 1024"),
    ("upload-too-large", "plain", "POST", "/api/search/image", npy(np.zeros((600, DIM), np.float32)), {}, 413,
     "the limit is 65536"),
    ("upload-declared-too-large", "plain", "POST", "/api/search/image", b"\x93NUMPY",
     {"content-length": str(10 ** 9)}, 413, "the limit is 65536"),
    ("upload-k0", "plain", "POST", "/api/search/image?k=0", npy(FEATS), {}, 422, "greater than or equal to 1"),
    ("upload-to-text-only", "scan", "POST", "/api/search/image", npy(FEATS), {}, 400,
     "image queries need an index of captions"),
    # ---- /api/images/{id}
    ("record-unknown", "plain", "GET", "/api/images/12345", None, {}, 404, "unknown image id"),
    ("thumb-unknown", "plain", "GET", "/api/images/12345/thumbnail", None, {}, 404, "unknown image id"),
    ("thumb-dots", "plain", "GET", "/api/images/%2E%2E/thumbnail", None, {}, 404, "unknown image id '..'"),
    ("thumb-encoded-traversal", "plain", "GET", "/api/images/..%2F..%2Fetc%2Fpasswd/thumbnail", None, {}, 404, ""),
    # ---- /api/attention
    ("attention-no-reranker", "plain", "GET", "/api/attention?id=3000000&q=cube", None, {}, 400, "--rerank CKPT"),
    ("attention-no-q", "scan", "GET", "/api/attention?id=3000000", None, {}, 422, "q: Field required"),
    ("attention-blank-q", "scan", "GET", "/api/attention?id=3000000&q=%20", None, {}, 422, "empty query"),
    ("attention-long-q", "scan", "GET", f"/api/attention?id=3000000&q={LONG}", None, {}, 422, "at most 500"),
    ("attention-control-q", "scan", "GET", "/api/attention?id=3000000&q=a%07b", None, {}, 422, "control character"),
    ("attention-unknown-id", "scan", "GET", "/api/attention?id=77&q=cube", None, {}, 404, "unknown image id '77'"),
    ("attention-no-id", "scan", "GET", "/api/attention?q=cube", None, {}, 422, "id: Field required"),
    ("text-to-scan-k0", "scan", "GET", "/api/search/text?q=cube&k=0", None, {}, 422, "greater than or equal"),
    # ---- Host header (DNS rebinding) on a loopback bind
    ("host-evil", "plain", "GET", "/api/health", None, {"host": "evil.example"}, 400, "Host 'evil.example'"),
    ("host-evil-port", "plain", "GET", "/api/search/text?q=cube", None, {"host": "evil.example:8000"}, 400,
     "DNS rebinding"),
    ("host-suffix", "plain", "GET", "/api/info", None, {"host": "localhost.evil.example:8000"}, 400, "is not served"),
    ("host-ip-suffix", "plain", "GET", "/", None, {"host": "127.0.0.1.nip.io"}, 400, "is not served"),
    ("host-lan-ip", "plain", "GET", "/api/health", None, {"host": "192.168.1.20:8000"}, 400, "is not served"),
    ("host-bad-port", "plain", "GET", "/api/health", None, {"host": "localhost:http"}, 400, "is not served"),
    ("host-open-bracket", "plain", "GET", "/api/health", None, {"host": "[::1"}, 400, "is not served"),
    ("host-empty", "plain", "GET", "/api/health", None, {"host": ""}, 400, "is not served"),
    ("host-upload", "plain", "POST", "/api/search/image", npy(FEATS), {"host": "attacker.test"}, 400,
     "is not served"),
    # ---- unknown routes, methods not allowed
    ("route-unknown", "plain", "GET", "/api/nothing", None, {}, 404, "Not Found"),
    ("route-api-root", "plain", "GET", "/api", None, {}, 404, "Not Found"),
    ("route-search-root", "plain", "GET", "/api/search", None, {}, 404, "Not Found"),
    ("route-redoc", "plain", "GET", "/redoc", None, {}, 404, "Not Found"),
    ("method-post-text", "plain", "POST", "/api/search/text?q=cube", b"", {}, 405, "Method Not Allowed"),
    ("method-put-image", "plain", "PUT", "/api/search/image", npy(FEATS), {}, 405, "Method Not Allowed"),
    ("method-delete-record", "plain", "DELETE", "/api/images/3000000", None, {}, 405, "Method Not Allowed"),
    ("method-post-health", "plain", "POST", "/api/health", b"", {}, 405, "Method Not Allowed"),
    ("method-patch-page", "plain", "PATCH", "/", b"", {}, 405, "Method Not Allowed"),
]


def endpoint(url: str) -> str:
    """The endpoint a case exercises, for the count by endpoint."""
    path = url.split("?")[0]
    for prefix in ("/api/search/text", "/api/search/image", "/api/images", "/api/attention", "/api/health",
                   "/api/info"):
        if path.startswith(prefix):
            return prefix
    return "other routes"


def test_at_least_40_cases_over_every_endpoint() -> None:
    by_endpoint: dict[str, int] = {}
    for case in CASES:
        by_endpoint[endpoint(case[3])] = by_endpoint.get(endpoint(case[3]), 0) + 1
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
    assert {"/api/search/text", "/api/search/image", "/api/images", "/api/attention", "/api/health",
            "/api/info", "other routes"} <= set(by_endpoint), by_endpoint


def assert_one_detail(res, status: int, message: str) -> None:
    assert res.status_code == status, (res.status_code, res.text)
    assert res.headers["content-type"].startswith("application/json"), res.headers
    body = res.json()
    assert set(body) == {"detail"}, body
    detail = body["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail and message in detail, detail
    assert "Traceback" not in detail


def assert_no_traceback_logged(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        assert record.exc_info is None and "Traceback" not in record.getMessage(), record.getMessage()


@pytest.mark.parametrize(("client_name", "method", "url", "body", "headers", "status", "message"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_is_4xx_with_one_json_detail(clients: dict[str, TestClient], caplog: pytest.LogCaptureFixture,
                                                 client_name: str, method: str, url: str, body: bytes | None,
                                                 headers: dict, status: int, message: str) -> None:
    caplog.set_level(logging.DEBUG)
    res = clients[client_name].request(method, url, content=body, headers=headers)
    assert 400 <= status < 500
    assert_one_detail(res, status, message)
    assert_no_traceback_logged(caplog)


def test_the_refusals_are_not_blanket(clients: dict[str, TestClient], synth_data: Path) -> None:
    """The same endpoints answer 200 to good requests: every loopback Host form, a Fortran-order upload (as its C
    order twin), an integer upload, a query with tabs and spaces (collapsed), k = 1 and k = 100."""
    client = clients["plain"]
    for host in ("localhost", "localhost:8000", "127.0.0.1:1", "[::1]:8000", "[::1]", "LOCALHOST"):
        assert client.get("/api/health", headers={"host": host}).status_code == 200, host
    feats = np.asarray(PrecompSplit(synth_data, "test").images[4])
    c_order = client.post("/api/search/image?k=5", content=npy(feats)).json()
    fortran = client.post("/api/search/image?k=5", content=npy(np.asfortranarray(feats))).json()
    assert c_order["hits"] and [h["id"] for h in fortran["hits"]] == [h["id"] for h in c_order["hits"]]
    for version in ((2, 0), (3, 0)):  # numpy.save writes 2.0 / 3.0 for large headers / UTF-8 field names
        res = client.post("/api/search/image?k=5", content=npy(feats, version=version)).json()
        assert [h["id"] for h in res["hits"]] == [h["id"] for h in c_order["hits"]]
    assert client.post("/api/search/image?k=1", content=npy((feats * 100).astype(np.int16))).status_code == 200
    res = client.get("/api/search/text", params={"q": "\ta  red\n cube ", "k": 100}).json()
    assert res["query"] == "a red cube" and len(res["hits"]) == 100
    assert len(client.get("/api/search/text", params={"q": "cube", "k": 1}).json()["hits"]) == 1


def test_host_names_are_parsed_strictly() -> None:
    assert [host_name(h) for h in ("localhost:8000", "[::1]:80", "127.0.0.1", "[::1]", "Example.COM")] == [
        "localhost", "::1", "127.0.0.1", "::1", "example.com"]
    assert [host_name(h) for h in ("", ":80", "[::1", "[::1]x", "a:b", "a:123456", "[::1]:")] == [None] * 7


def test_info_shows_no_absolute_path(clients: dict[str, TestClient], site: dict[str, Path], synth_data: Path) -> None:
    info = clients["plain"].get("/api/info")
    assert info.status_code == 200
    text = info.text
    assert str(site["root"]) not in text and str(synth_data) not in text and str(Path.home()) not in text
    body = info.json()
    assert body["images"]["index"] == "images" and body["captions"]["index"] == "captions"  # the directory names
    assert body["data"]["root"] == synth_data.name

    def strings(value):
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    assert not [s for s in strings(body) if s.startswith("/") or ":\\" in s]


def test_docs_work_offline(clients: dict[str, TestClient]) -> None:
    """/docs is one page rendering /openapi.json with inline script: no http(s) URL, no script or style from elsewhere
    (the FastAPI default loads Swagger UI from a CDN); / likewise."""
    import re

    client = clients["plain"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"]
    assert 'fetch("openapi.json")' in docs.text and client.get("/openapi.json").status_code == 200
    for page in (docs.text, client.get("/").text):
        assert not re.findall(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", page, flags=re.I)
        for attr in re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", page, flags=re.I):
            assert not re.match(r"^[a-z][a-z0-9+.-]*:|^//", attr, flags=re.I), attr  # relative links only
        assert "<link" not in page.lower() or 'rel="stylesheet"' not in page.lower()


# ------------------------------------------------------------------------------------------ the validator itself
@pytest.mark.parametrize(("call", "message"), [
    (lambda: check_text(""), "empty query"),
    (lambda: check_text(" \t\n "), "empty query"),
    (lambda: check_text(None), "must be a string"),
    (lambda: check_text(b"cube"), "must be a string"),
    (lambda: check_text("a" * 11, 10), "11 characters; the limit is 10"),
    (lambda: check_text("a\x00b"), "control character"),
    (lambda: check_text("a\udcffb"), "unpaired surrogate"),
    (lambda: check_k(0), "between 1 and"),
    (lambda: check_k(11, 10), "between 1 and 10, got 11"),
    (lambda: check_k(True), "must be an integer"),
    (lambda: check_k(2.0), "must be an integer"),
    (lambda: check_k("5"), "must be an integer"),
    (lambda: check_features(np.zeros((3, 4), np.complex128), [None, 4]), "dtype complex128"),
    (lambda: check_features(np.zeros((3, 4), bool), [None, 4]), "dtype bool"),
    (lambda: check_features(np.zeros((3, 4), object), [None, 4]), "pickled objects"),
    (lambda: check_features(np.full((3, 4), np.nan), [None, 4]), "NaN or infinity"),
    (lambda: check_features(np.zeros((0, 4)), [None, 4]), "0 regions"),
    (lambda: check_features(np.zeros((2, 0, 4)), [None, 4], batch=True), "0 regions"),
    (lambda: check_features(np.zeros((0, 3, 4)), [None, 4], batch=True), "a batch of 0 images"),
    (lambda: check_features(np.zeros((3, 5)), [None, 4]), "reads (regions, 4)"),
    (lambda: check_features(np.zeros((2, 3, 4)), [None, 4]), "shape (2, 3, 4)"),
    (lambda: check_features(np.zeros((5, 4)), [None, 4], max_regions=4), "5 regions; between 1 and 4"),
    (lambda: check_features(np.zeros(3), [4]), "reads (4,)"),
    (lambda: check_boxes(np.zeros((3, 4)), (2, 8)), "expected (2, 4) per image"),
    (lambda: check_boxes(np.zeros((3, 5)), (3, 8)), "expected (3, 4) per image"),
    (lambda: check_boxes(np.full((3, 4), np.inf), (3, 8)), "NaN or infinity"),
    (lambda: check_boxes(np.zeros((3, 4), np.complex64), (3, 8)), "boxes must be numbers"),
])
def test_validator_refuses_with_one_line(call, message: str) -> None:
    with pytest.raises(QueryError) as err:
        call()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_validator_accepts_and_normalises() -> None:
    assert check_text("  A\tred \n cube ") == "A red cube"
    assert check_k(np.int64(3), 3) == 3
    out = check_features(np.arange(8, dtype=np.int16).reshape(2, 4), [None, 4])
    assert out.dtype == np.float32 and out.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert check_features(np.zeros((2, 3, 4), ">f8"), [36, 4], batch=True).shape == (2, 3, 4)
    assert check_boxes([[0, 0, 1, 1]], (1, 8)).tolist() == [[0, 0, 1, 1]]


# ------------------------------------------------------------------------------------------ itmatch search (CLI)
def index_digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def _features_file(tmp_path: Path, name: str, array: np.ndarray) -> str:
    path = tmp_path / f"{name}.npy"
    np.save(path, array, allow_pickle=True)
    return str(path)


CLI_CASES = [
    # (id, index, argv after the index (FILE: a features file written from the array), array, message)
    ("text-empty", "images", ["--text", ""], None, "empty query"),
    ("text-blank", "images", ["--text", "  \t "], None, "empty query"),
    ("text-one-of-two-empty", "images", ["--text", "a red cube", "--text", ""], None, "empty query"),
    ("text-control", "images", ["--text", "red\x1bcube"], None, "control character"),
    ("text-k0", "images", ["--text", "a red cube", "-k", "0"], None, "-k: 0 must be >= 1"),  # refused by the parser
    ("text-k-negative", "images", ["--text", "a red cube", "-k", "-4"], None, "-k: -4 must be >= 1"),
    ("features-nan", "captions", ["--image-features", "FILE"], NAN, "features contain NaN or infinity"),
    ("features-inf", "captions", ["--image-features", "FILE"], INF, "features contain NaN or infinity"),
    ("features-zero-regions", "captions", ["--image-features", "FILE"], np.zeros((0, DIM), np.float32), "0 regions"),
    ("features-zero-batch", "captions", ["--image-features", "FILE"], np.zeros((0, 36, DIM), np.float32),
     "a batch of 0 images"),
    ("features-complex", "captions", ["--image-features", "FILE"], FEATS.astype(np.complex64), "dtype complex64"),
    ("features-bool", "captions", ["--image-features", "FILE"], FEATS > 0.5, "dtype bool"),
    ("features-strings", "captions", ["--image-features", "FILE"], np.array([["x"] * DIM] * 36),
     "features must be numbers"),
    ("features-wrong-dim", "captions", ["--image-features", "FILE"], FEATS[:, :31], "reads (regions, 32)"),
    ("features-4d", "captions", ["--image-features", "FILE"], FEATS[None, None], "shape (1, 1, 36, 32)"),
    ("features-scalar", "captions", ["--image-features", "FILE"], np.float32(3), "shape ()"),
    ("features-overflow", "captions", ["--image-features", "FILE"], FEATS.astype(np.float64) * 1e300,
     "too large for float32"),
    ("features-k0", "captions", ["--image-features", "FILE", "-k", "0"], FEATS, "-k: 0 must be >= 1"),
    ("boxes-wrong-shape", "captions", ["--image-features", "FILE", "--image-boxes", "BOXES"], FEATS,
     "expected (36, 4) per image"),
]


@pytest.mark.parametrize(("index", "argv", "array", "message"), [c[1:] for c in CLI_CASES],
                         ids=[c[0] for c in CLI_CASES])
def test_search_cli_refuses_with_one_line(capsys, tmp_path: Path, site: dict[str, Path], index: str, argv: list,
                                          array, message: str) -> None:
    before = index_digest(site[index])
    assert before  # the index files exist, so the comparison below means something
    argv = [_features_file(tmp_path, "feats", array) if a == "FILE" else
            _features_file(tmp_path, "boxes", np.zeros((35, 4), np.float32)) if a == "BOXES" else a for a in argv]
    code, out, err = run_cli(capsys, "search", str(site[index]), *argv)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("itmatch: error: ") and message in lines[0], err
    assert "Traceback" not in out + err and out == ""
    assert index_digest(site[index]) == before


def test_search_cli_still_answers_good_queries(capsys, tmp_path: Path, site: dict[str, Path],
                                               synth_data: Path) -> None:
    """The validator passes what it should: a text query with extra whitespace (same hits as without), integer
    features, features of a dataset image (same hits as --image)."""
    import json

    split = PrecompSplit(synth_data, "test")
    spaced = run_cli(capsys, "search", str(site["images"]), "--text", "  a red \t cube ", "--json")
    plain = run_cli(capsys, "search", str(site["images"]), "--text", "a red cube", "--json")
    assert spaced[0] == plain[0] == 0
    assert [h["id"] for h in json.loads(spaced[1])[0]["hits"]] == [h["id"] for h in json.loads(plain[1])[0]["hits"]]
    feats = _features_file(tmp_path, "f", np.asarray(split.images[3]))
    by_file = run_cli(capsys, "search", str(site["captions"]), "--image-features", feats, "--json")
    by_id = run_cli(capsys, "search", str(site["captions"]), "--image", str(split.ids[3]), "--json")
    assert by_file[0] == by_id[0] == 0
    assert [h["row"] for h in json.loads(by_file[1])[0]["hits"]] == [h["row"] for h in json.loads(by_id[1])[0]["hits"]]
