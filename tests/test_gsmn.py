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
    model = tiny_model(True).train()
    model.set_loss(margin=0.2, max_violation=True)
    images, boxes, captions, lengths, depends = random_inputs(5, 5)
    loss = model.training_loss(images, captions, lengths, epoch=0, boxes=boxes, depends=depends)["loss"]
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
