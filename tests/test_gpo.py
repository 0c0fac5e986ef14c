"""GPO against the paper's formula written out in numpy (GRU equations by hand), per sample and unpadded."""

import math

import numpy as np
import pytest
import torch

from itmatch.modules.gpo import Gpo, positional_encoding_1d


def test_positional_encoding_is_the_sine_table() -> None:
    pe = positional_encoding_1d(32, 3).double().numpy()
    assert pe.shape == (3, 32)
    np.testing.assert_allclose(pe[0], [0.0, 1.0] * 16, atol=1e-7)  # position 0: sin 0, cos 0
    for j in range(16):
        angle = 2 * 10000 ** (-2 * j / 32)
        assert pe[2, 2 * j] == pytest.approx(math.sin(angle), abs=1e-6)
        assert pe[2, 2 * j + 1] == pytest.approx(math.cos(angle), abs=1e-6)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _gru_pass(xs: np.ndarray, w_ih, w_hh, b_ih, b_hh) -> np.ndarray:
    """h_t = (1 - z) * n + z * h_{t-1} with r, z, n as in the GRU paper / torch docs (gate order r, z, n)."""
    hid = w_hh.shape[1]
    h, out = np.zeros(hid), []
    for x in xs:
        gi, gh = w_ih @ x + b_ih, w_hh @ h + b_hh
        r = _sigmoid(gi[:hid] + gh[:hid])
        z = _sigmoid(gi[hid : 2 * hid] + gh[hid : 2 * hid])
        n = np.tanh(gi[2 * hid :] + r * gh[2 * hid :])
        h = (1 - z) * n + z * h
        out.append(h)
    return np.stack(out)


def oracle_gpo(features: np.ndarray, gpo: Gpo) -> tuple[np.ndarray, np.ndarray]:
    """One unpadded sample (n, D): weights from the formula, then a weighted sum of per-dimension sorted values."""
    n = len(features)
    p = {k: v.detach().double().numpy() for k, v in gpo.state_dict().items()}
    pe = np.array([[math.sin(k * 10000 ** (-(d - d % 2) / 32)) if d % 2 == 0 else
                    math.cos(k * 10000 ** (-(d - d % 2) / 32)) for d in range(32)] for k in range(n)])
    fwd = _gru_pass(pe, p["gru.weight_ih_l0"], p["gru.weight_hh_l0"], p["gru.bias_ih_l0"], p["gru.bias_hh_l0"])
    bwd = _gru_pass(pe[::-1], p["gru.weight_ih_l0_reverse"], p["gru.weight_hh_l0_reverse"],
                    p["gru.bias_ih_l0_reverse"], p["gru.bias_hh_l0_reverse"])[::-1]
    scores = ((fwd + bwd) / 2) @ p["linear.weight"][0]
    weights = np.exp((scores - scores.max()) / 0.1)
    weights /= weights.sum()
    ordered = -np.sort(-features, axis=0)  # every dimension descending
    return weights @ ordered, weights


def _gpo(seed: int = 0) -> Gpo:
    torch.manual_seed(seed)
    return Gpo(32, 32).double()


def test_one_position_returns_the_vector_itself() -> None:
    x = torch.randn(1, 1, 5, dtype=torch.float64)
    pooled, weights = _gpo()(x, torch.tensor([1]))
    assert weights.tolist() == [[1.0]]
    torch.testing.assert_close(pooled, x[:, 0])


def test_two_positions_by_hand() -> None:
    """Input weights 0, so the GRU sees only biases: z = sigmoid(0) = 1/2, n = tanh(atanh(0.8)) = 0.8 for unit 0
    of the forward direction, and the backward direction (all zero) stays at h = 0. Forward states: h1 = (1 - z) n
    = 0.4, h2 = (1 - z) n + z h1 = 0.6; averaged with 0: 0.2 and 0.3; scorer reads unit 0; softmax([0.2, 0.3] / 0.1)
    = [1, e] / (1 + e)."""
    gpo = _gpo()
    hid = 32
    with torch.no_grad():
        for p in gpo.parameters():
            p.zero_()
        gpo.gru.bias_ih_l0[2 * hid] = math.atanh(0.8)
        gpo.linear.weight[0, 0] = 1.0
    x = torch.tensor([[[1.0, 5.0, -2.0], [3.0, -1.0, 0.5]]], dtype=torch.float64)
    pooled, weights = gpo(x, torch.tensor([2]))
    w = np.array([1.0, math.e]) / (1 + math.e)
    np.testing.assert_allclose(weights[0].detach().numpy(), w, rtol=1e-12)
    by_hand = w[0] * np.array([3.0, 5.0, 0.5]) + w[1] * np.array([1.0, -1.0, -2.0])  # columns sorted descending
    np.testing.assert_allclose(pooled[0].detach().numpy(), by_hand, rtol=1e-12)
    np.testing.assert_allclose(oracle_gpo(x[0].numpy(), gpo)[0], by_hand, rtol=1e-12)  # the oracle agrees


def test_zero_scorer_gives_the_mean() -> None:
    gpo = _gpo()
    with torch.no_grad():
        gpo.linear.weight.zero_()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    pooled, weights = gpo(x, torch.tensor([4, 3]))
    torch.testing.assert_close(weights, torch.tensor([[0.25] * 4, [1 / 3] * 3 + [0.0]], dtype=torch.float64))
    torch.testing.assert_close(pooled, torch.stack([x[0].mean(0), x[1, :3].mean(0)]))


def test_batched_equals_the_per_sample_oracle() -> None:
    gpo = _gpo(3)
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([5, 1, 3, 5, 2, 4])
    x = torch.randn(6, 7, 4, generator=gen, dtype=torch.float64)
    pooled, weights = gpo(x, lengths)
    assert weights.shape == (6, 5)
    for b, n in enumerate(lengths.tolist()):
        want, w = oracle_gpo(x[b, :n].numpy(), gpo)
        # rtol 1e-6: the positional table is float32 upstream (and here), the oracle's is float64
        np.testing.assert_allclose(pooled[b].detach().numpy(), want, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(weights[b, :n].detach().numpy(), w, rtol=1e-6, atol=1e-9)
        assert torch.all(weights[b, n:] == 0)


def test_padding_and_garbage_never_change_the_output() -> None:
    gpo = Gpo(32, 32)
    gen = torch.Generator().manual_seed(2)
    lengths = torch.tensor([3, 1, 4])
    x = torch.randn(3, 4, 6, generator=gen)
    garbage = torch.cat([x, torch.zeros(3, 5, 6)], dim=1)
    mask = torch.arange(9)[None, :, None] >= lengths[:, None, None]
    garbage = torch.where(mask, 1e6 * torch.randn(3, 9, 6, generator=gen), garbage)
    a, _ = gpo(x, lengths)
    b, _ = gpo(garbage, lengths)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    alone = torch.cat([gpo(x[i : i + 1, :n], lengths[i : i + 1])[0] for i, n in enumerate(lengths.tolist())])
    torch.testing.assert_close(a, alone)


def test_gradients_reach_the_gru_and_scorer() -> None:
    gpo = Gpo(32, 32)
    pooled, _ = gpo(torch.randn(3, 4, 5), torch.tensor([4, 2, 3]))
    pooled.pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gpo.parameters())


def test_pooling_and_gradients_equal_upstreams_sort_along_axis_1_bitwise() -> None:
    """Gpo sorts a transposed contiguous copy along its last axis; upstream sorts axis 1 in place. Same output
    and the same gradient for the features, bit for bit, with padded slots."""
    torch.manual_seed(0)
    gpo = Gpo(32, 32)
    lengths = torch.tensor([5, 2, 7, 7])
    features = torch.randn(4, 7, 16, requires_grad=True)
    weights = gpo.pool_weights(lengths).detach()
    pad = torch.arange(7)[None, :, None] >= lengths[:, None, None]
    upstream_sorted = features.masked_fill(pad, -10000.0).sort(dim=1, descending=True)[0].masked_fill(pad, 0)
    upstream = (upstream_sorted * weights[..., None]).sum(1)
    probe = torch.linspace(-1, 1, 16)
    (grad_upstream,) = torch.autograd.grad((upstream * probe).sum(), features)
    pooled, got_weights = gpo(features, lengths)
    (grad,) = torch.autograd.grad((pooled * probe).sum(), features)
    assert torch.equal(got_weights.detach(), weights)
    assert torch.equal(pooled, upstream) and pooled.abs().sum() > 0
    assert torch.equal(grad, grad_upstream) and grad[1, :2].abs().sum() > 0
    assert not grad[1, 2:].any()  # padded slots get no gradient
