"""`itmatch serve` end to end: the real command under uvicorn on 127.0.0.1, driven by Chromium (Playwright) and by a
bounded load test (2,000 requests, 20 concurrent, zero errors; p50/p99 printed and saved).

Artifacts (the browser screenshot, the load-test figures) go to $ITMATCH_TEST_ARTIFACTS, default runs/test-artifacts.
Chromium: Debian's package, installed here with apt-get when missing (root only); the browser test skips, saying
why, where it cannot be installed. `playwright install` is not used (it downloads from the internet).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from itmatch.data.precomp import PrecompSplit  # noqa: E402
from itmatch.search import build_index  # noqa: E402
from tests.serving import REPO, running_server  # noqa: E402
from tests.test_index import save_model  # noqa: E402

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def artifacts_dir() -> Path:
    out = Path(os.environ.get("ITMATCH_TEST_ARTIFACTS", REPO / "runs" / "test-artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def site(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A VSE++ trained for ~10 s on the small synthetic dataset, its two indexes, and a (random) SCAN re-ranker."""
    from itmatch.config import load_preset
    from itmatch.training import BEST, fit

    root = tmp_path_factory.mktemp("site")
    cfg = load_preset("vsepp_synth", [f"data.path={json.dumps(str(synth_data))}", "model.embed_dim=64",
                                      "model.word_dim=32", "data.batch_size=32", "train.epochs=8", "train.lr=1e-3",
                                      "train.lr_update=6", "train.max_violation=false"])
    fit(cfg, root / "vsepp")
    build_index(root / "vsepp" / BEST, synth_data, gallery="images", out=root / "images")
    build_index(root / "vsepp" / BEST, synth_data, gallery="captions", out=root / "captions")
    scan = save_model(root / "scan.pt", synth_data, "scan", cross_attn="t2i", agg_func="Mean")
    return {"images": root / "images", "captions": root / "captions", "scan": scan, "data": synth_data}


@contextlib.contextmanager
def server(*args: str) -> Iterator[str]:
    """`python -m itmatch serve ARGS` (`running_server`, its output in a temporary log); yields its URL."""
    with tempfile.TemporaryDirectory() as tmp, running_server(list(args), Path(tmp) / "serve.log") as (url, _):
        yield url


def ensure_chromium() -> str:
    """Debian's Chromium, installed with apt-get (as root) when missing; skips saying why when it cannot be."""
    found = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).is_file() else None)
    if found:
        return found
    if not shutil.which("apt-get"):
        pytest.skip("Chromium is not installed and this system has no apt-get to install Debian's package")
    if os.geteuid() != 0:
        pytest.skip("Chromium is not installed and installing it needs root: run `apt-get install -y chromium`")
    import fcntl

    with open("/tmp/itmatch-chromium-install.lock", "w") as lock:  # pytest-xdist workers install one at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not Path(CHROMIUM).is_file():
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
            done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:  # package lists may be missing or stale
                subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
                done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0 or not Path(CHROMIUM).is_file():
                last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                pytest.skip(f"Chromium could not be installed with apt-get ({last[0][:200]})")
    return CHROMIUM


def ground_truth_in_top(url: str, captions: list[str], k: int) -> tuple[str, list[int]]:
    """A test-split caption whose ground-truth image the served model ranks in its top k (asked over HTTP)."""
    for query in captions:
        res = httpx.get(f"{url}/api/search/text", params={"q": query, "k": k}, timeout=30).json()
        found = [h["id"] for h in res["hits"] if h["ground_truth"]]
        if found:
            return query, found
    pytest.fail(f"no test caption has its ground-truth image in the top {k}: is the model trained?")


def test_browser_finds_the_ground_truth_image(site: dict[str, Path], tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra has it)")
    chromium = ensure_chromium()
    split = PrecompSplit(site["data"], "test")
    k = 10
    # candidates = k: the re-ranker (random weights here) reorders the top 10 and the heat map has a SCAN to show
    with server("--index", str(site["images"]), "--index", str(site["captions"]), "--rerank", str(site["scan"]),
                "--candidates", str(k)) as url:
        query, truth = ground_truth_in_top(url, split.captions[::5], k)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(url + "/")
                page.wait_for_function("document.getElementById('info').textContent.includes('images:')")
                page.fill("#query", query)
                page.click("#search")
                page.wait_for_selector(".hit img")
                page.wait_for_function(f"document.querySelectorAll('.hit').length === {k}")
                cards = page.locator(".hit")
                shown = [int(cards.nth(i).get_attribute("data-id")) for i in range(cards.count())]
                marked = [int(x) for x in page.locator(".hit.gt").evaluate_all("els => els.map(e => e.dataset.id)")]
                assert set(truth) <= set(shown) and sorted(marked) == sorted(truth), (query, truth, shown, marked)
                assert "ground truth" in page.locator(".hit.gt .badge").first.inner_text()
                page.wait_for_function("[...document.querySelectorAll('.hit img')].every(i => i.complete && "
                                       "i.naturalWidth > 0)")  # thumbnails loaded
                page.locator(f".hit[data-id='{truth[0]}']").click()  # the image: its captions and the heat map
                page.wait_for_selector("#words button.on")
                page.wait_for_selector("#retrieved-caps li")
                painted = page.evaluate("""() => { const c = document.getElementById('heat');
                    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                    let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; }""")
                assert painted > 0, "the attention heat map drew nothing"
                assert page.locator("#gt-caps li").count() == 5
                shot = tmp_path / "serve.png"
                page.screenshot(path=str(shot), full_page=True)
            finally:
                browser.close()
    assert shot.stat().st_size > 10_000
    shutil.copy(shot, artifacts_dir() / "serve.png")


async def _fire(url: str, paths: list[str], concurrency: int) -> tuple[list[float], list[str]]:
    latencies: list[float] = []
    errors: list[str] = []
    queue: asyncio.Queue[str] = asyncio.Queue()
    for path in paths:
        queue.put_nowait(path)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        async def worker() -> None:
            while not queue.empty():
                path = queue.get_nowait()
                started = time.perf_counter()
                try:
                    res = await client.get(path)
                    if res.status_code != 200:
                        errors.append(f"{path}: {res.status_code} {res.text[:100]}")
                except httpx.HTTPError as err:
                    errors.append(f"{path}: {type(err).__name__} {err}")
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


def test_load_2000_requests_at_20_concurrent_without_errors(site: dict[str, Path]) -> None:
    from urllib.parse import quote

    split = PrecompSplit(site["data"], "test")
    n, concurrency = 2000, 20
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):  # 9 text queries (dataset captions) per image query (a gallery id)
        if i % 10 == 9:
            paths.append(f"/api/search/image?id={split.ids[int(rng.integers(split.n_images))]}&k=10")
        else:
            paths.append(f"/api/search/text?q={quote(split.captions[int(rng.integers(split.n_captions))])}&k=10")
    with server("--index", str(site["images"]), "--index", str(site["captions"])) as url:
        asyncio.run(_fire(url, paths[:40], concurrency))  # warm-up
        started = time.perf_counter()
        latencies, errors = asyncio.run(_fire(url, paths, concurrency))
        wall = time.perf_counter() - started
    assert not errors, f"{len(errors)} errors, first: {errors[0]}"
    assert len(latencies) == n
    ms = np.array(latencies) * 1000
    figures = {"requests": n, "concurrency": concurrency, "errors": len(errors), "wall_s": round(wall, 2),
               "requests_per_s": round(n / wall, 1), "p50_ms": round(float(np.percentile(ms, 50)), 1),
               "p99_ms": round(float(np.percentile(ms, 99)), 1), "max_ms": round(float(ms.max()), 1),
               "gallery": f"{split.n_images} images / {split.n_captions} captions, flat index, VSE++ 64-d",
               "cpus": os.cpu_count()}
    print(f"\nload test: {json.dumps(figures)}")
    (artifacts_dir() / "serve_load.json").write_text(json.dumps(figures, indent=2) + "\n")
