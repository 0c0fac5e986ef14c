"""Retrieval index: same top-k as brute force on the model's similarity matrix, stale/mismatched indexes refused
with one line, cross-attention re-ranking equal to the re-ranker's own ranking of the candidates."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from itmatch.checkpoints import native
from itmatch.checkpoints.loader import load_model
from itmatch.config import config_from_dict, config_to_dict
from itmatch.data.precomp import PrecompSplit
from itmatch.data.tokenize import text_tokenizer, vocab_words
from itmatch.data.vocab import load_vocab
from itmatch.errors import GalleryIndexError
from itmatch.index import GalleryIndex, IndexSpec
from itmatch.inference import compute_sims, encode_captions, encode_images, similarity_matrix
from itmatch.registry import create_model
from itmatch.search import Searcher, build_index
from tests.test_cli import assert_one_line_error, run_cli


def save_model(path: Path, data: Path, name: str = "vsepp", seed: int = 0, **model: object) -> Path:
    """A randomly initialised model for `data`, saved as `itmatch train` saves one."""
    dim = PrecompSplit(data, "test").feature_dim
    raw = {"model": {"name": name, "image_dim": dim, "vocab_size": 1, "embed_dim": 16, "word_dim": 8, **model}}
    cfg = config_from_dict(raw)
    tokenizer = text_tokenizer(cfg.model, load_vocab(data / "vocab.json"))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=len(tokenizer)))
    torch.manual_seed(seed)
    net = create_model(cfg.model)
    native.save({"config": config_to_dict(cfg), "model": net.state_dict(), "vocab": vocab_words(tokenizer)}, path)
    return path


@pytest.fixture(scope="module")
def vsepp(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("models") / "vsepp.pt", synth_data)


@pytest.fixture(scope="module")
def scan(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("models") / "scan.pt", synth_data, "scan", cross_attn="t2i",
                      agg_func="Mean")


def brute_force(ckpt: Path, data: Path) -> np.ndarray:
    loaded = load_model(ckpt)
    return compute_sims(loaded.model, PrecompSplit(data, "test"), loaded.vocab)  # (n_images, n_captions) float64


def cross_attention_scores(ckpt: Path, data: Path, n_images: int, n_captions: int) -> tuple[np.ndarray, np.ndarray]:
    """The (all images, first n_captions) and (first n_images, all captions) blocks of a model's similarity matrix."""
    loaded = load_model(ckpt)
    split = PrecompSplit(data, "test")
    images = encode_images(loaded.model, split)
    tokens = [loaded.vocab.encode(c) for c in split.captions]
    few, every = encode_captions(loaded.model, tokens[:n_captions]), encode_captions(loaded.model, tokens)
    return (similarity_matrix(loaded.model, images, few),
            similarity_matrix(loaded.model, images.rows(0, n_images), every))


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def assert_top_k(hits: list, scores: np.ndarray, k: int, atol: float = 1e-5) -> None:
    """Each query's hits are a brute-force top k of its row of `scores`: distinct rows whose true scores are the k
    best, in order. Equal scores (the synthetic data repeats captions) may come in either order."""
    best = -np.sort(-scores, axis=1)[:, :k]
    rows = np.array([[h.row for h in q] for q in hits])
    assert rows.shape == (len(scores), k) and all(len(set(r)) == k for r in rows.tolist())
    np.testing.assert_allclose(np.take_along_axis(scores, rows, axis=1), best, atol=atol)
    np.testing.assert_allclose([[h.score for h in q] for q in hits], best, atol=atol)


@pytest.mark.parametrize("spec", [IndexSpec(), IndexSpec(kind="ivf", nlist=8, nprobe=8)], ids=["flat", "ivf-all"])
def test_search_returns_the_brute_force_top_k(synth_data: Path, vsepp: Path, tmp_path: Path, spec) -> None:
    sims = brute_force(vsepp, synth_data)
    split = PrecompSplit(synth_data, "test")
    k = 10
    build_index(vsepp, synth_data, gallery="images", spec=spec, out=tmp_path / "images")
    searcher = Searcher.open(tmp_path / "images")
    hits = searcher.search_text(split.captions, k=k)  # every caption, text -> image
    assert_top_k(hits, sims.T, k)
    assert [h.id for h in hits[0]] == [split.ids[h.row] for h in hits[0]]

    build_index(vsepp, synth_data, gallery="captions", spec=spec, out=tmp_path / "captions")
    searcher = Searcher.open(tmp_path / "captions")
    hits = searcher.search_image(split.images[np.arange(split.n_images)], k=k)  # every image, image -> text
    assert_top_k(hits, sims, k)
    assert hits[3][0].text == split.captions[hits[3][0].row]
    assert hits[3][0].image_id == split.ids[hits[3][0].row // 5]


def test_stale_or_mismatched_indexes_are_refused_with_one_line(synth_data: Path, vsepp: Path, tmp_path: Path,
                                                                capsys) -> None:
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(vsepp.read_bytes())
    index = tmp_path / "index"
    assert run_cli(capsys, "index", "build", str(ckpt), "--data", str(synth_data), "--out", str(index))[0] == 0
    query = ["search", str(index), "--text", "a red cube"]
    assert run_cli(capsys, *query)[0] == 0

    save_model(tmp_path / "other.pt", synth_data, embed_dim=24)
    assert_one_line_error(*run_cli(capsys, *query, "--ckpt", str(tmp_path / "other.pt"))[::2],
                          "built with model.embed_dim=16 but")
    save_model(tmp_path / "scan.pt", synth_data, "scan")
    assert_one_line_error(*run_cli(capsys, *query, "--ckpt", str(tmp_path / "scan.pt"))[::2],
                          "built with a vsepp model but")
    assert_one_line_error(*run_cli(capsys, "search", str(index), "--image", "0")[::2], "holds images")

    state = native.load(ckpt)  # the checkpoint is retrained after the build: same path, new weights
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    native.save(state, ckpt)
    assert_one_line_error(*run_cli(capsys, *query)[::2], "is stale: built from weights")
    ckpt.write_bytes(vsepp.read_bytes())  # the same weights again: accepted (weights are fingerprinted, not files)
    assert run_cli(capsys, *query)[0] == 0

    faiss_file = index / "index.faiss"
    good = faiss_file.read_bytes()
    faiss_file.write_bytes(good[:-64])
    assert_one_line_error(*run_cli(capsys, *query)[::2], "does not match meta.json")
    faiss_file.write_bytes(good)
    meta = (index / "meta.json").read_text()
    (index / "meta.json").write_text(meta[: len(meta) // 2])
    assert_one_line_error(*run_cli(capsys, *query)[::2], "corrupt index metadata")
    (index / "meta.json").unlink()
    assert_one_line_error(*run_cli(capsys, *query)[::2], "no meta.json")
    assert_one_line_error(*run_cli(capsys, "search", str(tmp_path / "nothing"), "--text", "a")[::2],
                          "index not found")


def test_a_cross_attention_model_is_refused_as_an_index_and_named_as_a_reranker(synth_data: Path, scan: Path,
                                                                                 tmp_path: Path, capsys) -> None:
    gsmn = save_model(tmp_path / "gsmn.pt", synth_data, "gsmn")  # refused before its encoders ask for boxes
    for ckpt in (scan, gsmn):
        for gallery in ("images", "captions"):
            code, _, err = run_cli(capsys, "index", "build", str(ckpt), "--data", str(synth_data), "--gallery",
                                   gallery, "--out", str(tmp_path / gallery))
            assert_one_line_error(code, err, "re-rank its top candidates with this one")


def test_reranking_with_scan_is_scans_ranking_of_the_candidates(synth_data: Path, vsepp: Path, scan: Path,
                                                                 tmp_path: Path) -> None:
    split = PrecompSplit(synth_data, "test")
    by_caption, by_image = cross_attention_scores(scan, synth_data, n_images=2, n_captions=8)
    build_index(vsepp, synth_data, gallery="images", out=tmp_path / "images")
    queries = split.captions[:8]
    k = 5
    # every image a candidate: the two-stage result is SCAN's exhaustive top k
    full = Searcher.open(tmp_path / "images", rerank=scan, candidates=split.n_images).search_text(queries, k=k)
    assert_top_k(full, by_caption.T, k)
    # 15 candidates: SCAN's order among the embedding model's top 15
    stage_one = Searcher.open(tmp_path / "images").search_text(queries, k=15)
    two_stage = Searcher.open(tmp_path / "images", rerank=scan, candidates=15).search_text(queries, k=k)
    for q, (first, second) in enumerate(zip(stage_one, two_stage, strict=True)):
        rows = [h.row for h in first]
        expected = sorted(rows, key=lambda r: -by_caption[r, q])[:k]
        np.testing.assert_allclose([h.score for h in second], by_caption[expected, q], atol=1e-5)
        assert set(h.row for h in second) <= set(rows)
        assert all(h.first_score is not None for h in second)

    build_index(vsepp, synth_data, gallery="captions", out=tmp_path / "captions")
    hits = Searcher.open(tmp_path / "captions", rerank=scan, candidates=split.n_captions).search_image(
        split.images[np.arange(2)], k=k)
    assert_top_k(hits, by_image, k)


def test_cli_prints_ranked_results(synth_data: Path, vsepp: Path, tmp_path: Path, capsys) -> None:
    index = tmp_path / "caps"
    code, out, _ = run_cli(capsys, "index", "build", str(vsepp), "--data", str(synth_data), "--gallery", "captions",
                           "--kind", "hnsw", "--out", str(index))
    assert code == 0 and "indexed 500 captions (16-d, vsepp, hnsw)" in out
    image_id = PrecompSplit(synth_data, "test").ids[7]
    code, out, _ = run_cli(capsys, "search", str(index), "--image", str(image_id), "-k", "3")
    assert code == 0, out
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"image {image_id} -> top 3 of 500 captions (vsepp, hnsw index)")
    assert len(lines) == 5 and lines[2].split()[0] == "1"
    code, out, _ = run_cli(capsys, "search", str(index), "--image", str(image_id), "-k", "3", "--json")
    assert [h["rank"] for h in json.loads(out)[0]["hits"]] == [1, 2, 3]


def test_gallery_index_api(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 8)).astype(np.float32)
    index = GalleryIndex.build([vectors[:100], vectors[100:]], [f"item{i}" for i in range(300)])
    scores, rows = index.search(vectors[5], k=3)  # one 1-d query = a batch of one
    assert rows.shape == (1, 3) and index.ids_of(rows)[0][0] == "item" + str(int(np.argmax(vectors @ vectors[5])))
    np.testing.assert_allclose(scores[0], np.sort(vectors @ vectors[5])[::-1][:3], rtol=1e-5)
    assert index.search(vectors[:2], k=1000)[1].shape == (2, 300)
    with pytest.raises(GalleryIndexError, match="this index holds 8-d embeddings"):
        index.search(np.zeros((2, 9), dtype=np.float32))
    with pytest.raises(GalleryIndexError, match="lower --nlist"):
        GalleryIndex.build(vectors, spec=IndexSpec(kind="ivf", nlist=1024))
    index.save(tmp_path / "ix")
    again = GalleryIndex.open(tmp_path / "ix")
    assert again.ids == index.ids and again.search(vectors[:4])[1].tolist() == index.search(vectors[:4])[1].tolist()
