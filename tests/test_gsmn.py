"""GSMN: batched scoring vs the per-caption reference port, word graphs, box geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from itmatch.models.base import Encoded
from itmatch.models.gsmn import Gsmn, GsmnConfig, build
from itmatch.modules.geometry import PolarGaussianKernels
from itmatch.modules.graph_matching import sparse_adjacency
from tests.gsmn_reference import build_sparse_graph, gaussian_weights, pseudo_coords, reference_scores


def tiny_model(sparse: bool, *, embed: int = 64, lam: float = 20.0, seed: int = 0) -> Gsmn:
    torch.manual_seed(seed)
    cfg = GsmnConfig(image_dim=24, embed_dim=embed, vocab_size=30, word_dim=12, lambda_softmax=lam, sparse=sparse)
    model = build(cfg)
    with torch.no_grad():  # spread the kernels so that the geometry matters
        model.i2t_graph.conv.precision_rho.uniform_(0.2, 0.6)
        model.i2t_graph.conv.precision_theta.uniform_(0.5, 1.5)
    return model.eval()


def random_inputs(n_img: int, n_cap: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n_img, 7, 24, generator=gen)
    xy = torch.rand(n_img, 7, 2, generator=gen) * 0.7
    wh = torch.rand(n_img, 7, 2, generator=gen) * 0.3 + 0.01
    boxes = torch.cat([xy, xy + wh], -1)
    lengths = torch.randint(2, 11, (n_cap,), generator=gen)
    lengths[0] = 10
    captions = torch.randint(4, 30, (n_cap, 10), generator=gen)
    depends = []
    for n in lengths.tolist():
        pairs = [[0, int(torch.randint(1, n, (1,), generator=gen))]]
        pairs += [[int(a), int(b)] for a, b in torch.randint(0, n + 2, (n, 2), generator=gen)]
        depends.append(pairs)
    return images, boxes, captions, lengths, depends


@pytest.mark.parametrize("sparse", [False, True])
def test_batched_scores_match_the_per_caption_reference(sparse: bool) -> None:
    model = tiny_model(sparse)
    images, boxes, captions, lengths, depends = random_inputs(9, 13)
    with torch.no_grad():
        img = model.encode_image(images, boxes)
        txt = model.encode_text(captions, lengths, depends)
        model.budget_mb = 0.05  # several tiles in both directions
        sims = model.similarity(img, txt)
        d = model.cfg.embed_dim
        ref = reference_scores(model, img.emb[..., :d], boxes, txt.emb[..., :d], lengths.tolist(), depends, shard=4)
        packed = model.similarity(img.to("cpu", torch.float64), txt.packed().to("cpu", torch.float64))
    assert sims.shape == (9, 13)
    assert torch.isfinite(sims).all()
    assert (sims - ref).abs().max() <= 1e-5
    assert (packed - ref.double()).abs().max() <= 1e-5


@pytest.mark.parametrize("sparse", [False, True])
def test_training_scores_and_gradients_match_the_reference(sparse: bool) -> None:
    """With autograd on, the tiles take their differentiable path: same scores, same gradients as the port."""
    model = tiny_model(sparse).double().train()
    images, boxes, captions, lengths, depends = random_inputs(6, 7, seed=3)
    images, boxes = images.double(), boxes.double()
    weights = torch.randn(6, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model.budget_mb = 0.05  # several tiles in both directions
    d = model.cfg.embed_dim

    def gradients(batched: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        img, txt = model.encode_image(images, boxes), model.encode_text(captions, lengths, depends)
        if batched:
            sims = model.similarity(img, txt)
        else:
            sims = reference_scores(model, img.emb[..., :d], boxes, txt.emb[..., :d], lengths.tolist(), depends)
        (sims * weights).sum().backward()
        return sims.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    sims, grads = gradients(batched=True)
    ref, ref_grads = gradients(batched=False)
    assert (sims - ref).abs().max() <= 1e-10
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], rtol=1e-7, atol=1e-10), name


def test_scores_on_two_threads_equal_one_thread_exactly() -> None:
    """Caption tiles run side by side on worker threads (`run_tiles`); each tile is computed as on one thread."""
    model = tiny_model(True)
    images, boxes, captions, lengths, depends = random_inputs(9, 13)
    model.budget_mb = 0.05  # several caption tiles
    saved = torch.get_num_threads()
    try:
        with torch.inference_mode():
            img, txt = model.encode_image(images, boxes), model.encode_text(captions, lengths, depends).packed()
            torch.set_num_threads(1)
            serial = model.similarity(img, txt)
            torch.set_num_threads(2)
            threaded = model.similarity(img, txt)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(serial, threaded)


def test_dense_and_sparse_share_the_node_level_but_differ_in_graph_weights() -> None:
    images, boxes, captions, lengths, depends = random_inputs(3, 4)
    dense, sparse = tiny_model(False), tiny_model(True)
    depends = [[p for p in pairs if p[0] != p[1]] for pairs in depends]  # a self-dependency doubles f_ii
    with torch.no_grad():
        a = dense.encode_text(captions, lengths).emb
        b = sparse.encode_text(captions, lengths, depends).emb
    d = dense.cfg.embed_dim
    assert torch.equal(a[..., :d], b[..., :d])
    # upstream's word-graph weights sum to one over each node's neighbours: the coefficients are ~1 either way
    # (spec B.5.2: the parse changes no score, except through self-dependencies)
    valid = torch.arange(a.shape[1])[None] < lengths[:, None]
    assert torch.allclose(a[..., d:][valid], torch.ones(()), atol=1e-5)
    assert torch.allclose(b[..., d:][valid], torch.ones(()), atol=1e-5)


def test_sparse_adjacency_from_a_hand_written_dependency_list() -> None:
    # "<start> a man rides a horse <end>": CoreNLP 1-based indices, ROOT pair first; (7, 1) points past the caption
    pairs = [[0, 3], [2, 1], [3, 2], [3, 5], [5, 4], [7, 1], [3, 3]]
    adj = sparse_adjacency(pairs, 7)
    expected = torch.eye(7)
    for g, d in [(2, 1), (3, 2), (3, 5), (5, 4)]:
        expected[g, d] = expected[d, g] = 1
    expected[3, 3] = 2  # a self-dependency is set, then the identity added (as upstream)
    assert torch.equal(adj, expected)
    assert adj[0].sum() == 1  # the ROOT pair [0, 3] is skipped, so <start> links to nothing
    assert torch.equal(adj, build_sparse_graph(pairs, 7))


def test_gaussian_kernels_match_the_reference_formula() -> None:
    torch.manual_seed(1)
    conv = PolarGaussianKernels(16, 32, 8)
    boxes = torch.rand(2, 5, 4) * 0.5
    boxes[..., 2:] += boxes[..., :2]
    coords = pseudo_coords(boxes)
    ref = gaussian_weights(conv, coords[..., 0], coords[..., 1]).view(2, 5, 5, 8).sum(2)
    with torch.no_grad():
        assert torch.allclose(conv.node_coefficients(boxes), ref, atol=1e-6)
        # theta = atan2(dx, dy): a neighbour straight to the right of a node is at angle -pi/2 from it
        right = torch.tensor([[[0.1, 0.1, 0.2, 0.2], [0.5, 0.1, 0.6, 0.2]]])
        assert torch.allclose(pseudo_coords(right)[0, 0, 1], torch.tensor([0.4, -math.pi / 2]))


def test_every_parameter_gets_a_gradient_in_training() -> None:
    from tests.conftest import training_recipe

    model = tiny_model(True).train()
    recipe = training_recipe(model, max_violation=True)
    images, boxes, captions, lengths, depends = random_inputs(5, 5)
    loss = recipe.loss(images, captions, lengths, epoch=0, boxes=boxes, depends=depends)["loss"]
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_encoded_features_flow_through_the_shared_evaluation_helpers() -> None:
    model = tiny_model(False)
    images, boxes, captions, lengths, _ = random_inputs(4, 6)
    with torch.no_grad():
        img = model.encode_image(images, boxes)
        txt = model.encode_text(captions, lengths)
        full = model.similarity(img, txt)
        rows = torch.cat([model.similarity(img.rows(i, i + 1), txt) for i in range(4)])
    assert isinstance(img, Encoded) and img.emb.shape[-1] == model.cfg.embed_dim + 8
    np.testing.assert_allclose(full.numpy(), rows.numpy(), atol=1e-6)


# ------------------------------------------------------------------------------------------------- data files
def _simulate_original_loader(raw: np.ndarray, sizes: list[dict], n_captions: int, batch_size: int,
                              swap_wh: bool) -> list[np.ndarray]:
    """The original's evaluation data path, by hand: in-place division per access, tensors aliasing the array,
    two unshuffled passes of a batch_size loader; returns the boxes recorded for every caption row."""
    bbox = raw.copy()
    recorded: list[np.ndarray] = [np.empty(0)] * n_captions
    for _ in range(2):
        for b0 in range(0, n_captions, batch_size):
            views = {}
            for k in range(b0, min(b0 + batch_size, n_captions)):
                img = k // 5
                boxes = bbox[img]  # a view: the division below changes the dataset's array
                w, h = sizes[img]["image_w"], sizes[img]["image_h"]
                if swap_wh:  # the code the models were released with
                    w, h = h, w
                for i in range(boxes.shape[0]):
                    box = boxes[i]
                    box[0] /= w
                    box[1] /= h
                    box[2] /= w
                    box[3] /= h
                views[k] = torch.Tensor(boxes) if boxes.dtype == np.float32 else torch.Tensor(boxes.copy())
            for k, t in views.items():  # collate: torch.stack copies what the aliasing tensors show now
                recorded[k] = t.numpy().copy()
    return recorded


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fold5", [False, True])
@pytest.mark.parametrize("swap_wh", [True, False], ids=["release", "upstream"])
def test_box_compat_reproduces_the_cumulative_in_place_division(dtype: type, fold5: bool, swap_wh: bool) -> None:
    from itmatch.data.gsmn_files import compat_boxes, normalised_boxes

    rng = np.random.default_rng(0)
    n_img, batch = 3, 4  # 15 captions: batches [0-3] [4-7] [8-11] [12-14]
    raw = (rng.random((n_img, 2, 4)) * 300 + 1).astype(dtype)
    sizes = [{"image_w": 640, "image_h": 480}, {"image_w": 500, "image_h": 333}, {"image_w": 375, "image_h": 500}]
    size_arr = np.array([[s["image_w"], s["image_h"]] for s in sizes], dtype=np.float64)
    rows = _simulate_original_loader(raw, sizes, 5 * n_img, batch, swap_wh=swap_wh)
    expected = np.stack([rows[5 * j] if fold5 else rows[j] for j in range(n_img)]).astype(np.float32)
    got = compat_boxes(raw, size_arr, n_images=n_img, batch_size=batch, fold5=fold5, swap_wh=swap_wh)
    np.testing.assert_array_equal(got, expected)
    if not fold5:  # image 1 is scored with image 0's boxes (row 1 of the per-caption list), as upstream
        assert np.array_equal(got[1] > 0, got[0] > 0)
        if dtype == np.float32:  # caption rows 0 and 1 share a batch: both saw 5 + 4 divisions
            cur = raw[0].copy()
            div = [480, 640, 480, 640] if swap_wh else [640, 480, 640, 480]  # release: x / h, y / w
            for _ in range(9):
                cur = cur / np.array(div, dtype=np.float32)
            np.testing.assert_array_equal(got[0], cur)
    fixed = normalised_boxes(raw, size_arr)
    np.testing.assert_allclose(fixed[1], raw[1] / np.array([500, 333, 500, 333]), rtol=1e-6)


def test_object_array_image_sizes_load_without_running_pickled_code(tmp_path) -> None:
    import pickle

    from itmatch.data.gsmn_files import load_image_sizes
    from itmatch.errors import DataError

    sizes = np.empty(2, dtype=object)
    sizes[0], sizes[1] = {"image_w": 500, "image_h": 333}, {"image_w": np.int64(640), "image_h": 480}
    np.save(tmp_path / "ok.npy", sizes, allow_pickle=True)
    np.testing.assert_array_equal(load_image_sizes(tmp_path / "ok.npy"), [[500, 333], [640, 480]])
    # Python 2 layout: protocol 2, numpy.core module names, byte-string keys read as latin1
    with open(tmp_path / "py2.npy", "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "|O", "fortran_order": False, "shape": (2,)})
        pickle.dump(sizes, fh, protocol=2)
    np.testing.assert_array_equal(load_image_sizes(tmp_path / "py2.npy"), [[500, 333], [640, 480]])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = np.empty(1, dtype=object)
    evil[0] = Evil()
    np.save(tmp_path / "evil.npy", evil, allow_pickle=True)
    with pytest.raises(DataError, match="refusing to load"):
        load_image_sizes(tmp_path / "evil.npy")


def test_synthetic_dataset_writes_the_gsmn_files(tmp_path) -> None:
    import json

    from itmatch.data.gsmn_files import load_image_sizes, read_precaps
    from itmatch.data.synthetic import dependency_pairs, generate
    from itmatch.data.tokenize import tokenize
    from itmatch.data.vocab import load_vocab, save_vocab, vocab_from_captions_files

    generate(tmp_path, seed=1, dim=8, sizes={"train": 12, "dev": 3, "test": 3})
    assert np.array_equal(np.load(tmp_path / "test_ims_bbx.npy"), np.load(tmp_path / "test_boxes.npy"))
    assert (load_image_sizes(tmp_path / "test_ims_size.npy") == [480, 320]).all()
    caps = (tmp_path / "test_caps.txt").read_text(encoding="utf-8").splitlines()
    deps = json.loads((tmp_path / "test_caps.json").read_text(encoding="utf-8"))
    assert len(deps) == len(caps) == 15
    for cap, pairs in zip(caps, deps, strict=True):
        n = len(tokenize(cap))
        assert pairs[0][0] == 0 and sorted(d for _, d in pairs) == list(range(1, n + 1))  # a tree over the tokens
    assert dependency_pairs(["a", "red", "cube", "left", "of", "a", "ball", "."]) == [
        [0, 3], [3, 7], [3, 1], [3, 2], [7, 4], [7, 5], [7, 6], [3, 8]]
    save_vocab(vocab_from_captions_files([tmp_path / "train_caps.txt", tmp_path / "dev_caps.txt"]), tmp_path / "v.json")
    vocab = load_vocab(tmp_path / "v.json")
    assert read_precaps(tmp_path / "test_precaps_stan.txt", 15) == [vocab.encode(c) for c in caps]


def test_evaluation_scores_in_float32_as_the_original_shard_loop(monkeypatch) -> None:
    """Upstream's shard_xattn casts its float64 embedding copies back to float32 before scoring; SCAN keeps float64."""
    from itmatch.inference import similarity_matrix

    model = tiny_model(False)
    images, boxes, captions, lengths, _ = random_inputs(3, 4)
    seen = []
    original = Gsmn.similarity

    def spy(self, img, txt):
        seen.append(img.emb.dtype)
        return original(self, img, txt)

    monkeypatch.setattr(Gsmn, "similarity", spy)
    with torch.no_grad():
        img, txt = model.encode_image(images, boxes), model.encode_text(captions, lengths)
        similarity_matrix(model, img.to("cpu", torch.float64), txt)
        similarity_matrix(model, img, txt, dtype=torch.float64)
    assert seen == [torch.float32, torch.float64]
    from itmatch.registry import method_spec

    assert method_spec("gsmn").eval_dtype == torch.float32
    assert method_spec("scan").eval_dtype == method_spec("vsepp").eval_dtype == torch.float64


def test_triangle_indices_cached_in_inference_mode_serve_autograd() -> None:
    from itmatch.modules.graph_matching import _triangle, _triangle_gram

    n = 13  # a size no other test caches first
    with torch.inference_mode():
        _triangle(n, torch.device("cpu"))
    x = torch.rand(2, n, 32, requires_grad=True)
    _triangle_gram(x, 16).sum().backward()  # raised "Inference tensors cannot be saved for backward"
    assert x.grad is not None and x.grad.abs().sum() > 0
