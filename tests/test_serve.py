"""`itmatch serve` API: answers match the Searcher, ground truth is marked, every bad input is a 4xx with a one-line
message, no path leaves the image directory, the concurrency gate answers 503 when full."""

from __future__ import annotations

import io
import json
import shlex
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from itmatch.data.precomp import PrecompSplit  # noqa: E402
from itmatch.search import Searcher, build_index  # noqa: E402
from itmatch.serve import RetrievalService, ServeLimits, create_app, normalise_caption  # noqa: E402
from tests.test_cli import assert_one_line_error, run_cli  # noqa: E402
from tests.test_index import save_model  # noqa: E402


@pytest.fixture(scope="module")
def indexes(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    vsepp = save_model(root / "vsepp.pt", synth_data)
    scan = save_model(root / "scan.pt", synth_data, "scan", cross_attn="t2i", agg_func="Mean")
    build_index(vsepp, synth_data, gallery="images", out=root / "images")
    build_index(vsepp, synth_data, gallery="captions", out=root / "captions")
    return {"images": root / "images", "captions": root / "captions", "scan": scan, "vsepp": vsepp}


@pytest.fixture(scope="module")
def service(indexes: dict[str, Path]) -> RetrievalService:
    svc = RetrievalService.open([indexes["images"], indexes["captions"]], limits=ServeLimits(max_upload_bytes=1 << 16))
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service: RetrievalService) -> TestClient:
    return TestClient(create_app(service))


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def test_text_search_is_the_searchers_answer_with_ground_truth_marked(client: TestClient, indexes, synth_data) -> None:
    split = PrecompSplit(synth_data, "test")
    query = split.captions[7]
    res = client.get("/api/search/text", params={"q": "  " + query.upper() + "  ", "k": 100})  # all 100 images
    assert res.status_code == 200, res.text
    body = res.json()
    owners = sorted({split.ids[k // 5] for k, c in enumerate(split.captions)
                     if normalise_caption(c) == normalise_caption(query)})
    assert sorted(body["ground_truth"]) == owners and split.ids[1] in owners
    expected = Searcher.open(indexes["images"]).search_text(query.upper(), k=100)[0]
    assert [h["id"] for h in body["hits"]] == [h.id for h in expected]
    np.testing.assert_allclose([h["score"] for h in body["hits"]], [h.score for h in expected], atol=1e-5)
    assert sorted(h["id"] for h in body["hits"] if h["ground_truth"]) == owners
    assert body["hits"][0]["thumbnail"] == f"/api/images/{body['hits'][0]['id']}/thumbnail"
    other = client.get("/api/search/text", params={"q": "a purple unicorn", "k": 3}).json()
    assert other["ground_truth"] is None and len(other["hits"]) == 3
    assert not any(h["ground_truth"] for h in other["hits"])


def test_image_search_by_id_and_by_upload(client: TestClient, synth_data: Path) -> None:
    split = PrecompSplit(synth_data, "test")
    image_id = split.ids[4]
    by_id = client.get("/api/search/image", params={"id": str(image_id), "k": 100}).json()
    assert by_id["ground_truth"] == [image_id] and len(by_id["hits"]) == 100
    assert all(h["ground_truth"] == (h["image_id"] == image_id) for h in by_id["hits"])
    assert all(h["text"] == split.captions[h["id"]] for h in by_id["hits"])
    uploaded = client.post("/api/search/image", params={"k": 100}, content=npy(np.asarray(split.images[4])))
    assert uploaded.status_code == 200, uploaded.text
    assert [h["id"] for h in uploaded.json()["hits"]] == [h["id"] for h in by_id["hits"]]
    assert uploaded.json()["ground_truth"] is None
    record = client.get(f"/api/images/{image_id}").json()
    assert record["captions"] == split.captions[20:25]


def test_thumbnails_are_the_rendered_scenes(client: TestClient, synth_data: Path, tmp_path: Path) -> None:
    from PIL import Image

    from itmatch.data.synthetic import render_scene

    image_id = PrecompSplit(synth_data, "test").ids[2]
    res = client.get(f"/api/images/{image_id}/thumbnail")
    assert res.status_code == 200 and res.headers["content-type"] == "image/png"
    scene = next(json.loads(line) for line in (synth_data / "scenes.jsonl").read_text().splitlines()
                 if json.loads(line)["id"] == image_id)
    render_scene(scene["objects"], tmp_path / "ref.png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(res.content))), np.asarray(Image.open(tmp_path / "ref.png")))
    assert client.get(f"/api/images/{image_id}/thumbnail").content == res.content  # cached


LONG = "a" * 501


@pytest.mark.parametrize(("url", "status", "message"), [
    ("/api/search/text?k=5", 422, "q: Field required"),
    ("/api/search/text?q=&k=5", 422, "q: String should have at least 1 character"),
    ("/api/search/text?q=%20%20%09&k=5", 422, "empty query"),
    (f"/api/search/text?q={LONG}", 422, "q: String should have at most 500 characters"),
    ("/api/search/text?q=cube&k=0", 422, "k: Input should be greater than or equal to 1"),
    ("/api/search/text?q=cube&k=101", 422, "k: Input should be less than or equal to 100"),
    ("/api/search/text?q=cube&k=ten", 422, "k: Input should be a valid integer"),
    ("/api/search/image?id=12345", 404, "unknown image id '12345'"),
    ("/api/search/image?id=%2E%2E%2Fetc", 404, "unknown image id '../etc'"),
    (f"/api/search/image?id={'9' * 65}", 422, "id: String should have at most 64 characters"),
    ("/api/search/image", 422, "id: Field required"),
    ("/api/images/12345", 404, "unknown image id"),
    ("/api/images/12345/thumbnail", 404, "unknown image id"),
    ("/api/images/..%2F..%2F..%2Fetc%2Fpasswd/thumbnail", 404, ""),
    ("/api/images/%2E%2E/thumbnail", 404, "unknown image id '..'"),
    ("/api/attention?id=3000000&q=cube", 400, "start the server with --rerank CKPT of a SCAN model"),
    ("/api/nothing", 404, "Not Found"),
])
def test_bad_requests_are_4xx_with_one_line(client: TestClient, url: str, status: int, message: str) -> None:
    res = client.get(url)
    assert res.status_code == status, res.text
    detail = res.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and message in detail


def asgi_get(app, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as given (no client-side dot-segment removal), straight through the ASGI interface."""
    import asyncio

    messages: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        messages.append(message)

    from urllib.parse import unquote

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": unquote(path), "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver")], "client": ("127.0.0.1", 1), "server": ("testserver", 80)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")


def test_no_path_traversal(client: TestClient) -> None:
    for raw in ("/api/images/../../../../etc/passwd", "/api/images/3000000/../../../../etc/passwd",
                "/api/images/..%2F..%2F..%2Fetc%2Fpasswd/thumbnail", "/../../etc/passwd",
                "/api/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd/thumbnail", "/api/images/..%5C..%5Cwin.ini/thumbnail"):
        status, body = asgi_get(client.app, raw)
        assert status == 404 and b"root:" not in body, (raw, status, body)


@pytest.mark.parametrize(("body", "headers", "status", "message"), [
    (b"", {}, 400, "empty upload"),
    (b"\x89PNG\r\n\x1a\n" + b"0" * 100, {"content-type": "image/png"}, 415, "a PNG picture was uploaded"),
    (b"\xff\xd8\xff\xe0" + b"0" * 100, {"content-type": "image/jpeg"}, 415, "a JPEG picture was uploaded"),
    (b"hello world", {}, 415, "not a .npy file"),
    (npy(np.zeros((36, 32), np.float32))[:100], {}, 400, "unreadable .npy upload"),
    (npy(np.array([{"a": 1}], dtype=object)), {}, 422, "pickled objects are never loaded"),
    (npy(np.zeros((36, 31), np.float32)), {}, 422, "this index's model reads (regions, 32)"),
    (npy(np.zeros((2, 36, 32), np.float32)), {}, 422, "features have shape (2, 36, 32)"),
    (npy(np.zeros(32, np.float32)), {}, 422, "features have shape (32,)"),
    (npy(np.array([["x"] * 32] * 36)), {}, 422, "features must be numbers"),
    (npy(np.full((36, 32), np.nan, np.float32)), {}, 422, "NaN or infinity"),
    (npy(np.zeros((0, 32), np.float32)), {}, 422, "0 regions"),
    (npy(np.zeros((600, 32), np.float32)), {}, 413, "the limit is 65536"),  # 76 kB > the test's 64 KiB limit
])
def test_bad_uploads_are_4xx_with_one_line(client: TestClient, body: bytes, headers: dict, status: int,
                                           message: str) -> None:
    res = client.post("/api/search/image?k=5", content=body, headers=headers)
    assert res.status_code == status, res.text
    detail = res.json()["detail"]
    assert "\n" not in detail and message in detail, detail


def test_an_upload_without_a_length_is_cut_off_at_the_limit(client: TestClient) -> None:
    def chunks():
        for _ in range(100):
            yield b"\x93NUMPY" + b"0" * 4096  # 400 kB in chunks, no content-length

    res = client.post("/api/search/image?k=5", content=chunks())
    assert res.status_code == 413 and "exceeds the limit of 65536 bytes" in res.json()["detail"]


def test_a_query_of_the_wrong_side_names_the_missing_index(indexes: dict[str, Path]) -> None:
    only_captions = TestClient(create_app(RetrievalService.open([indexes["captions"]])))
    res = only_captions.get("/api/search/text", params={"q": "a cube"})
    assert res.status_code == 400 and "text queries need an index of images" in res.json()["detail"]
    only_images = TestClient(create_app(RetrievalService.open([indexes["images"]])))
    res = only_images.get("/api/search/image", params={"id": "3000000"})
    assert res.status_code == 400 and "image queries need an index of captions" in res.json()["detail"]
    assert only_images.get("/api/info").json()["captions"] is None


def test_scan_reranking_gives_word_to_region_attention(indexes: dict[str, Path], synth_data: Path) -> None:
    svc = RetrievalService.open([indexes["images"]], rerank=indexes["scan"], candidates=20)
    client = TestClient(create_app(svc))
    assert client.get("/api/info").json()["attention"] is True
    image_id = PrecompSplit(synth_data, "test").ids[0]
    res = client.get("/api/attention", params={"id": str(image_id), "q": "A red cube left of a ball."})
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["words"] == ["<start>", "a", "red", "cube", "left", "of", "a", "ball", ".", "<end>"]
    assert body["image_size"] == [480, 320]  # the synthetic canvas, which the boxes are given in
    weights = np.array(body["weights"])
    assert weights.shape == (10, 36) and np.allclose(weights.sum(1), 1, atol=1e-4)  # t2i: each word over regions
    np.testing.assert_allclose(body["boxes"], np.load(synth_data / "test_boxes.npy")[0], atol=0.06)
    hits = client.get("/api/search/text", params={"q": "A red cube left of a ball.", "k": 20}).json()["hits"]
    scores = {h["id"]: h["score"] for h in hits}
    assert body["score"] == pytest.approx(scores[image_id], abs=1e-5) if image_id in scores else True
    assert all("first_score" in h for h in hits)
    svc.close()


def test_real_pictures_are_downscaled_and_mapping_cannot_escape(tmp_path: Path, indexes, synth_data) -> None:
    """A gallery with picture files (id_mapping.json) serves them; a mapping that leaves the directory is refused."""
    import shutil

    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    (data / "scenes.jsonl").unlink()
    (data / "images").mkdir()
    ids = PrecompSplit(data, "test").ids
    Image.new("RGB", (1200, 800), (10, 200, 30)).save(data / "images" / "photo0.jpg")
    (tmp_path / "secret.png").write_bytes(b"not for you")
    (data / "id_mapping.json").write_text(json.dumps({str(ids[0]): "photo0.jpg", str(ids[1]): "../../secret.png"}))
    svc = RetrievalService([Searcher.open(indexes["images"], data=data)])
    client = TestClient(create_app(svc))
    res = client.get(f"/api/images/{ids[0]}/thumbnail")
    assert res.status_code == 200
    assert Image.open(io.BytesIO(res.content)).size == (384, 256)
    res = client.get(f"/api/images/{ids[1]}/thumbnail")
    assert res.status_code == 403 and "points outside the image directory" in res.json()["detail"]
    res = client.get(f"/api/images/{ids[2]}/thumbnail")
    assert res.status_code == 404 and "has no picture" in res.json()["detail"]
    svc.close()


def test_thumbnails_come_from_the_image_directory_training_reads(tmp_path: Path, indexes, synth_data) -> None:
    """With both flickr30k-images/ and images/ present, the served picture is the one training decodes."""
    import shutil

    from PIL import Image

    from itmatch.data.images import ImageSplit

    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    (data / "scenes.jsonl").unlink()
    ids = PrecompSplit(data, "test").ids
    colours = {"flickr30k-images": (200, 30, 30), "images": (30, 30, 200)}
    for folder, colour in colours.items():
        (data / folder).mkdir()
        Image.new("RGB", (64, 48), colour).save(data / folder / f"{ids[0]}.png")
    (data / "id_mapping.json").write_text(json.dumps({str(i): f"{i}.png" for i in ids}))
    trained = ImageSplit(data, "test", workers=0).images.paths[0]
    assert trained == data / "flickr30k-images" / f"{ids[0]}.png"  # F30K's folder name comes first
    svc = RetrievalService([Searcher.open(indexes["images"], data=data)])
    res = TestClient(create_app(svc)).get(f"/api/images/{ids[0]}/thumbnail")
    assert res.status_code == 200, res.text
    served = np.asarray(Image.open(io.BytesIO(res.content)).convert("RGB"))
    assert served.shape == (48, 64, 3) and (served == colours[trained.parent.name]).all()
    svc.close()


def test_a_full_queue_answers_503(indexes: dict[str, Path]) -> None:
    svc = RetrievalService.open([indexes["images"]], limits=ServeLimits(max_running=1, max_waiting=1))
    app = create_app(svc)
    release, original = threading.Event(), svc.search_text

    def slow(q: str, k: int):
        release.wait(10)
        return original(q, k)

    svc.search_text = slow  # type: ignore[method-assign]
    client = TestClient(app).__enter__()  # one event loop for every request, as under uvicorn
    answers: list[int] = []
    workers = [threading.Thread(target=lambda: answers.append(client.get("/api/search/text?q=cube").status_code))
               for _ in range(2)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 10
    while app.state.gate.pending < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    res = client.get("/api/search/text?q=cube")  # one running, one waiting: the third is turned away
    assert res.status_code == 503 and res.headers["retry-after"] == "1" and "server busy" in res.json()["detail"]
    assert client.get("/api/health").status_code == 200  # health does not queue behind searches
    release.set()
    for w in workers:
        w.join(10)
    assert answers == [200, 200]
    client.__exit__(None, None, None)
    svc.close()


def test_page_and_openapi_docs(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and 'id="query"' in page.text and "text/html" in page.headers["content-type"]
    spec = client.get("/openapi.json").json()
    assert {"/api/search/text", "/api/search/image", "/api/health", "/api/info", "/api/attention"} <= set(spec["paths"])
    assert "post" in spec["paths"]["/api/search/image"] and "get" in spec["paths"]["/api/search/image"]
    assert client.get("/docs").status_code == 200
    assert client.get("/api/health").json()["status"] == "ok"


def test_cli_errors_are_one_line(capsys, tmp_path: Path, indexes: dict[str, Path]) -> None:
    assert_one_line_error(*run_cli(capsys, "serve", "--index", str(tmp_path / "none"))[::2], "index not found")
    assert_one_line_error(*run_cli(capsys, "serve", "--index", str(indexes["images"]), "--index",
                                   str(indexes["images"]))[::2], "two indexes of images")


def test_the_demo_prints_serve_commands_that_work(capsys, synth_data: Path, indexes, tmp_path: Path) -> None:
    from itmatch.cli import build_parser
    from itmatch.cli.demo import serve_commands

    lines = serve_commands(indexes["vsepp"], synth_data, tmp_path)
    for line in lines[:2]:
        assert run_cli(capsys, *shlex.split(line)[1:])[0] == 0
    args = build_parser().parse_args(shlex.split(lines[2])[1:])
    assert args.index == [str(tmp_path / "index_images"), str(tmp_path / "index_captions")] and args.port == 8000
    svc = RetrievalService.open(args.index)
    assert svc.images is not None and svc.captions is not None
    svc.close()


def test_thumbnails_of_the_vse_infinity_layout_come_from_the_parent_of_precomp(tmp_path: Path) -> None:
    """DATA/precomp/ holds the features, DATA/id_mapping.json and DATA/images/ the pictures, as training reads
    them; serving looked in precomp/ only and drew no picture."""
    from PIL import Image

    from itmatch.serve.media import find_image_dir, read_id_mapping

    data = tmp_path / "data"
    (data / "precomp").mkdir(parents=True)
    (data / "images").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(data / "images" / "a.png")
    (data / "id_mapping.json").write_text('{"7": "a.png"}', encoding="utf-8")
    assert find_image_dir(data / "precomp") == data / "images"
    assert read_id_mapping(data / "precomp") == {"7": "a.png"}
    assert find_image_dir(tmp_path) is None and read_id_mapping(tmp_path) == {}
