"""uvicorn's HTTP/1.1 protocol with the slow-client limits it lacks (`guarded_protocol`).

uvicorn has a keep-alive timeout but no header-read timeout: a client that opens a connection and sends its request
head one byte at a time holds the connection for ever, and since uvicorn's `limit_concurrency` counts open
connections, a few hundred such clients make every request, `/api/health` included, answer 503. The protocol here
(a subclass of `uvicorn.protocols.http.h11_impl.H11Protocol`, passed as `uvicorn.Config(http=...)`) therefore:

- closes a connection whose request head (request line and headers) is not complete `header_timeout` seconds after
  the connection opened, or after the first byte of a further request on a kept-alive connection, answering 408;
- keeps at most `max_incomplete_per_client` connections of one client address, and `max_incomplete` in all, in that
  state: a new one beyond the cap closes the oldest that have been waiting at least `grace` seconds (so a flood of
  idle sockets evicts itself, not other clients, nor a browser's or a load test's burst of fresh connections, which
  send their heads within milliseconds; and never holds `limit_concurrency`, which `serve` sets above
  `max_incomplete`);
- answers a malformed request with a JSON `{"detail": ...}` 400, as every other refusal of the server.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def _raw_response(status: int, reason: str, detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """`H11Protocol` with a request-head timeout and caps on connections still sending their head (see the module)."""

    header_timeout: float = 10.0
    max_incomplete_per_client: int = 16
    max_incomplete: int = 128
    grace: float = 1.0  # a connection is evicted by newer ones only after waiting this long for its head
    # connections still sending a request head -> (client address, since); oldest first; one per `guarded_protocol`
    incomplete: OrderedDict[GuardedH11Protocol, tuple[str, float]] = OrderedDict()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._start_head()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._start_head()  # the first byte of a further request on a kept-alive connection
        super().data_received(data)
        if self._head_timer is not None and self.conn.their_state is not h11.IDLE:
            self._end_head()  # the request head is complete (or refused)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_head()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """A malformed request: one JSON detail line, then close (uvicorn's own answer is plain text)."""
        self._end_head()
        if not self.transport.is_closing():
            self.transport.write(_raw_response(400, "Bad Request", f"malformed HTTP request: {msg}"))
            self.transport.close()

    # ------------------------------------------------------------------------------------------------ internals
    def _client_host(self) -> str:
        return self.client[0] if self.client else "?"

    def _start_head(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)
        incomplete = type(self).incomplete
        host, now = self._client_host(), self.loop.time()
        incomplete[self] = (host, now)
        for cap, mine in ((self.max_incomplete_per_client, True), (self.max_incomplete, False)):
            waiting = [(p, since) for p, (h, since) in incomplete.items() if h == host or not mine]
            stale = [p for p, since in waiting if now - since >= self.grace]  # oldest first
            for oldest in stale[: max(0, len(waiting) - cap)]:
                oldest._drop()

    def _end_head(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None
        type(self).incomplete.pop(self, None)

    def _drop(self) -> None:
        """Close a connection that has not sent a complete request head (evicted by a newer one)."""
        self._end_head()
        if not self.transport.is_closing():
            self.transport.close()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        type(self).incomplete.pop(self, None)
        if not self.transport.is_closing():
            self.transport.write(_raw_response(408, "Request Timeout", "request head not complete within "
                                               f"{self.header_timeout:g} s; connection closed"))
            self.transport.close()


def guarded_protocol(*, header_timeout: float, max_incomplete_per_client: int, max_incomplete: int,
                     grace: float = 1.0) -> Any:
    """A `GuardedH11Protocol` class with these limits and its own table of incomplete connections (one per server)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "header_timeout": float(header_timeout), "max_incomplete_per_client": int(max_incomplete_per_client),
        "max_incomplete": int(max_incomplete), "grace": float(grace), "incomplete": OrderedDict()})
