"""`itmatch serve` against hostile clients, over real sockets on 127.0.0.1 (marked `slow`; each test stops by itself):

- 300 connections trickling their request head one byte a second must not make the server answer 503 (uvicorn's
  `limit_concurrency` counts open connections, and uvicorn has no header-read timeout): `/api/health` and a search
  answer 200 within seconds throughout, and the server closes every trickling connection within its header timeout
  (`ServeLimits.header_timeout_s`, 10 s), the oldest at once when one client holds more than
  `max_incomplete_per_client` such connections;
- clients that disconnect mid-upload or mid-search, malformed requests, a huge `.npy` header and a foreign Host
  leave no traceback in the server's log.
"""

from __future__ import annotations

import select
import socket
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from itmatch.search import build_index  # noqa: E402
from itmatch.serve import ServeLimits  # noqa: E402
from tests.serving import running_server  # noqa: E402
from tests.test_index import save_model  # noqa: E402
from tests.test_serve_bad_inputs import npy_header  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
HEADER_TIMEOUT = ServeLimits().header_timeout_s
PER_CLIENT = ServeLimits().max_incomplete_per_client


@pytest.fixture(scope="module")
def indexes(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("slow_clients")
    model = save_model(root / "vsepp.pt", synth_data)
    build_index(model, synth_data, gallery="images", out=root / "images")
    build_index(model, synth_data, gallery="captions", out=root / "captions")
    return [str(root / "images"), str(root / "captions")]


def assert_no_traceback(log: Path) -> None:
    text = log.read_text()
    assert "Traceback" not in text and "Exception in ASGI application" not in text, text[-3000:]


def test_trickling_clients_neither_block_the_server_nor_stay_open(indexes: list[str], tmp_path: Path) -> None:
    n, head = 300, b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slowloris\r\nX-Pad: " + b"a" * 60
    log = tmp_path / "serve.log"
    with running_server([a for ix in indexes for a in ("--index", ix)], log) as (url, port):
        socks: dict[socket.socket, dict] = {}
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.setblocking(False)
            socks[s] = {"opened": time.monotonic(), "sent": 0, "closed": None, "answer": b""}
        probes: list[tuple[str, int, float]] = []
        started = time.monotonic()
        while time.monotonic() - started < HEADER_TIMEOUT + 4:  # probes on fresh connections, as new clients'
            tick = time.monotonic()
            for s, st in socks.items():  # one more byte of the head from every connection still open
                if st["closed"] is None and st["sent"] < len(head):
                    try:
                        s.send(head[st["sent"] : st["sent"] + 1])
                        st["sent"] += 1
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:  # reset or broken pipe: the server closed it
                        st["closed"] = time.monotonic()
            readable, _, _ = select.select([s for s, st in socks.items() if st["closed"] is None], [], [], 0)
            for s in readable:
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                if data:
                    socks[s]["answer"] += data
                else:
                    socks[s]["closed"] = time.monotonic()
            for path in ("/api/health", "/api/search/text?q=a%20red%20cube&k=5"):
                t0 = time.monotonic()
                try:
                    status = httpx.get(url + path, timeout=5).status_code
                except httpx.HTTPError as err:
                    status = f"{type(err).__name__}"
                probes.append((path, status, time.monotonic() - t0))
            time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
        for s in socks:
            s.close()
    assert len(probes) >= 2 * int(HEADER_TIMEOUT)  # the probes ran throughout
    bad = [p for p in probes if p[1] != 200 or p[2] > 3.0]
    assert not bad, f"{len(bad)} of {len(probes)} probes failed or were slow, first: {bad[:3]}"
    lifetimes = sorted(st["closed"] - st["opened"] for st in socks.values() if st["closed"] is not None)
    assert len(lifetimes) == n, f"{n - len(lifetimes)} trickling connections still open after {HEADER_TIMEOUT + 4} s"
    assert lifetimes[-1] <= HEADER_TIMEOUT + 3.5, lifetimes[-5:]  # seen once per 1 s tick, plus the probes
    timed_out = [st for st in socks.values() if st["answer"].startswith(b"HTTP/1.1 408")]
    evicted = [st for st in socks.values() if st["closed"] - st["opened"] < HEADER_TIMEOUT - 1]
    assert timed_out and all(b'"detail"' in st["answer"] for st in timed_out)  # the header timeout closed some
    assert len(evicted) >= n - 2 * PER_CLIENT  # and the per-client cap the rest, at once
    print(f"\n{len(probes)} probes, slowest {max(p[2] for p in probes) * 1000:.0f} ms; {len(evicted)} connections "
          f"evicted at once, {len(timed_out)} answered 408, longest open {lifetimes[-1]:.1f} s")
    assert_no_traceback(log)


def test_disconnects_and_malformed_requests_log_no_traceback(indexes: list[str], tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with running_server([a for ix in indexes for a in ("--index", ix)], log) as (url, port):
        def raw(data: bytes, *, read: bool) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(data)
                if not read:
                    return b""
                chunks = []
                while chunk := s.recv(65536):
                    chunks.append(chunk)
                return b"".join(chunks)

        feats = np.zeros((36, 32), np.float32)
        body = npy_header(feats.shape) + feats.tobytes()
        # the client goes away mid-upload, right after a search request, and before reading an answer
        raw(b"POST /api/search/image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n" + body[:2000],
            read=False)
        raw(b"GET /api/search/text?q=a%20red%20cube&k=100 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", read=False)
        raw(b"POST /api/search/image?k=100 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body, read=False)
        answer = raw(b"BLAH /\r\n\r\n", read=True)  # malformed request line
        assert answer.startswith(b"HTTP/1.1 400") and b'"detail"' in answer, answer
        answer = raw(b"GET /api/health HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n", read=True)
        assert answer.startswith(b"HTTP/1.1 400") and b"DNS rebinding" in answer, answer
        huge = httpx.post(f"{url}/api/search/image", content=npy_header((10 ** 8, 256)), timeout=10)
        assert huge.status_code == 413 and "(100000000, 256)" in huge.json()["detail"]
        time.sleep(1.0)  # let the server finish the abandoned requests
        assert httpx.get(f"{url}/api/health", timeout=5).status_code == 200
    assert_no_traceback(log)
