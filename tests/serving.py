"""`itmatch serve` as a subprocess for the end-to-end server tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(args: list[str], log: Path) -> Iterator[tuple[str, int]]:
    """`python -m itmatch serve ARGS` on a free port of 127.0.0.1, its output in `log`; yields (URL, port) once
    /api/health answers (the test fails with the server's output if it exits or is silent for 90 s), stops it
    afterwards."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "itmatch", "serve", *args, "--port", str(port)], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"itmatch serve exited with {proc.returncode}: {log.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"itmatch serve did not answer /api/health within 90 s: {log.read_text()}")
            time.sleep(0.2)
        yield url, port
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
