"""The batched cross-attention engine against a naive per-pair implementation written from the formulas."""

import itertools
import zlib

import pytest
import torch

from itmatch.modules.cross_attention import (
    XAttnConfig,
    length_ordered_tiles,
    tile_shape,
    xattn_scores,
    xattn_similarity,
)

NORMS = ["clipped_l2norm", "l2norm", "clipped", "no_norm", "softmax", "l1norm", "clipped_l1norm"]
AGGS = ["LogSumExp", "Mean", "Max", "Sum"]


def naive_pair(image: torch.Tensor, words: torch.Tensor, cfg: XAttnConfig) -> float:
    """One (image, caption) pair, valid words only, attended vectors materialised, no masks."""
    if cfg.direction == "t2i":
        query, context = words, image  # words attend to regions
    else:
        query, context = image, words  # regions attend to words
    raw = context @ query.T  # (S, Q)
    x = raw
    if cfg.raw_feature_norm in ("clipped_l2norm", "clipped", "clipped_l1norm"):
        x = torch.where(x > 0, x, 0.1 * x)
    if cfg.raw_feature_norm in ("clipped_l2norm", "l2norm"):
        x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-8)  # over the query axis
    elif cfg.raw_feature_norm in ("l1norm", "clipped_l1norm"):
        x = x / (x.abs().sum(1, keepdim=True) + 1e-8)
    elif cfg.raw_feature_norm == "softmax":
        x = torch.exp(x) / torch.exp(x).sum(1, keepdim=True)
    weights = torch.exp(cfg.lambda_softmax * x)
    alpha = weights / weights.sum(0, keepdim=True)  # over the context axis, (S, Q)
    attended = alpha.T @ context  # (Q, d)
    cos = [float(q @ a / max(float(q.norm() * a.norm()), 1e-8)) for q, a in zip(query, attended, strict=True)]
    r = torch.tensor(cos, dtype=torch.float64)
    match cfg.agg_func:
        case "LogSumExp":
            return float(torch.log(torch.exp(cfg.lambda_lse * r).sum()) / cfg.lambda_lse)
        case "Mean":
            return float(r.mean())
        case "Max":
            return float(r.max())
        case "Sum":
            return float(r.sum())
    raise AssertionError


def random_case(ni: int = 5, nc: int = 7, regions: int = 6, d: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(ni, regions, d, generator=gen), dim=-1)
    lengths = torch.randint(1, 10, (nc,), generator=gen)
    lengths[0] = 9
    captions = torch.nn.functional.normalize(torch.randn(nc, 9, d, generator=gen), dim=-1)
    captions[torch.arange(9)[None, :] >= lengths[:, None]] = 0.0  # zero padding, as the GRU encoder gives
    return images, captions, lengths


@pytest.mark.parametrize("direction,norm,agg", list(itertools.product(["t2i", "i2t"], NORMS, AGGS)))
def test_engine_matches_naive_per_pair(direction: str, norm: str, agg: str) -> None:
    cfg = XAttnConfig(direction=direction, raw_feature_norm=norm, agg_func=agg,
                      lambda_softmax=9.0 if direction == "t2i" else 4.0, lambda_lse=6.0)
    images, captions, lengths = random_case(seed=zlib.crc32(f"{direction}{norm}{agg}".encode()) % 1000)
    got = xattn_scores(images, captions, lengths, cfg)
    want = torch.tensor([[naive_pair(images[i], captions[c, : lengths[c]], cfg) for c in range(len(lengths))]
                         for i in range(len(images))], dtype=torch.float32)
    assert (got - want).abs().max().item() <= 1e-5


def test_garbage_in_padding_changes_nothing() -> None:
    images, captions, lengths = random_case(seed=3)
    noisy = captions.clone()
    mask = torch.arange(9)[None, :] >= lengths[:, None]
    noisy[mask] = torch.randn(int(mask.sum()), 16)
    longer = torch.cat([noisy, torch.randn(len(lengths), 4, 16)], dim=1)
    for direction, agg in itertools.product(["t2i", "i2t"], AGGS):
        for norm in ("softmax", "clipped_l2norm"):
            cfg = XAttnConfig(direction=direction, agg_func=agg, raw_feature_norm=norm)
            torch.testing.assert_close(xattn_scores(images, longer, lengths, cfg),
                                       xattn_scores(images, captions, lengths, cfg))


@pytest.mark.parametrize("budget_mb", [0.001, 0.05, 4096])
def test_tile_size_does_not_change_results(budget_mb: float) -> None:
    images, captions, lengths = random_case(ni=9, nc=23, seed=5)
    for direction in ("t2i", "i2t"):
        cfg = XAttnConfig(direction=direction, agg_func="LogSumExp")
        whole = xattn_scores(images, captions, lengths, cfg)
        tiled = xattn_similarity(images, captions, lengths, cfg, budget_mb=budget_mb)
        torch.testing.assert_close(tiled, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm", NORMS)
def test_tiles_side_by_side_on_two_threads_give_the_scores_of_one_pass(norm: str) -> None:
    """Without autograd, caption tiles run on two threads, each reusing its scratch buffers across tiles of
    different shapes; every norm and aggregation must give the whole-matrix scores."""
    images, captions, lengths = random_case(ni=9, nc=23, seed=11)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.get_num_threads() == 2, "the test needs two intra-op threads"
        for direction, agg in itertools.product(["t2i", "i2t"], AGGS):
            cfg = XAttnConfig(direction=direction, raw_feature_norm=norm, agg_func=agg)
            whole = xattn_scores(images, captions, lengths, cfg)
            with torch.inference_mode():
                tiled = xattn_similarity(images, captions, lengths, cfg, budget_mb=0.02)
            torch.testing.assert_close(tiled, whole, rtol=1e-6, atol=1e-6)
        assert torch.get_num_threads() == 2, "the workers' thread settings leaked"
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("n_captions,words,budget_mb", [(5000, 14, 16.0), (5000, 37, 16.0), (5000, 9, 3.0),
                                                         (12, 14, 16.0), (5000, 60, 0.5)])
def test_tiles_are_aligned_for_the_gemm_within_the_budget(n_captions: int, words: int,
                                                          budget_mb: float) -> None:
    """t2i's product has Nc*L columns, i2t's Ni*36: multiples of 8 keep MKL's GEMM on its fast path."""
    from itmatch.modules.cross_attention import CAPTION_ALIGN, tile_shape

    ti, tc = tile_shape(1000, n_captions, 36, words, 4, budget_mb)
    assert 6 * 36 * words * 4 * ti * tc <= budget_mb * 2**20
    assert tc == n_captions or tc <= CAPTION_ALIGN or tc % CAPTION_ALIGN == 0
    assert ti == 1000 or ti == 1 or ti % 2 == 0


def test_float64_matches_float32_closely_and_gradients_flow() -> None:
    images, captions, lengths = random_case(seed=7)
    cfg = XAttnConfig()
    s32 = xattn_similarity(images, captions, lengths, cfg)
    s64 = xattn_similarity(images.double(), captions.double(), lengths, cfg)
    assert s64.dtype == torch.float64 and (s64 - s32.double()).abs().max() < 1e-5
    images.requires_grad_(True)
    xattn_similarity(images, captions, lengths, cfg, budget_mb=0.01).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_tiled_gradients_equal_the_one_tile_gradients(direction: str) -> None:
    """Training through several image tiles of different heights (the images split once per height) gives the
    gradients of one tile holding every pair."""
    images, captions, lengths = random_case(ni=9, nc=13, seed=11)
    images, captions = images.double(), captions.double()
    cfg = XAttnConfig(direction=direction, lambda_softmax=9.0 if direction == "t2i" else 4.0)
    weights = torch.randn(9, 13, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = []
    for budget_mb in (1024.0, 0.01):
        tiled = images.clone().requires_grad_(True), captions.clone().requires_grad_(True)
        (xattn_similarity(*tiled, lengths, cfg, budget_mb=budget_mb) * weights).sum().backward()
        grads.append([t.grad for t in tiled])
    order = torch.argsort(lengths, descending=True, stable=True)
    tiles = length_ordered_tiles(lengths, order, lambda left, longest: tile_shape(9, left, 6, longest, 8, 0.01))
    heights = {ti for _, _, ti, _ in tiles}
    assert max(heights) < 9 and len(heights) > 1, f"several image tiles of different heights, not {heights}"
    for one, many in zip(*grads, strict=True):
        torch.testing.assert_close(many, one, rtol=1e-12, atol=1e-12)


def test_packed_storage_gives_the_same_scores() -> None:
    from itmatch.models.base import Encoded

    images, captions, lengths = random_case(ni=4, nc=11, seed=9)
    packed = Encoded(captions, lengths).packed()
    assert packed.emb.shape == (int(lengths.sum()), 16) and len(packed) == 11
    for direction in ("t2i", "i2t"):
        cfg = XAttnConfig(direction=direction)
        want = xattn_scores(images, captions, lengths, cfg)
        got = xattn_similarity(images.double(), packed.emb, lengths, cfg, offsets=packed.offsets, budget_mb=0.01)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("norm", ["clipped_l2norm", "softmax"])
def test_attention_weights_are_the_ones_the_score_is_computed_with(direction: str, norm: str) -> None:
    """Attending with `attention_weights`, then cosine + aggregation by hand, gives `xattn_scores` of the pair."""
    from itmatch.modules.cross_attention import XAttnConfig, attention_weights, xattn_scores

    g = torch.Generator().manual_seed(3)
    regions, words = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g,
                                                                                        dtype=torch.float64)
    cfg = XAttnConfig(direction=direction, raw_feature_norm=norm, agg_func="Mean")
    alpha = attention_weights(regions, words, cfg)  # (L, R)
    assert alpha.shape == (4, 7)
    if direction == "t2i":
        torch.testing.assert_close(alpha.sum(1), torch.ones(4, dtype=torch.float64))
        cos = torch.nn.functional.cosine_similarity(words, alpha @ regions, dim=-1)  # each word vs its attended
    else:
        torch.testing.assert_close(alpha.sum(0), torch.ones(7, dtype=torch.float64))
        cos = torch.nn.functional.cosine_similarity(regions, alpha.T @ words, dim=-1)  # each region
    score = xattn_scores(regions[None], words[None], torch.tensor([4]), cfg)[0, 0]
    torch.testing.assert_close(cos.mean(), score)


def shifted_softmax_pair(image: torch.Tensor, words: torch.Tensor, cfg: XAttnConfig) -> float:
    """One pair in float64 as upstream's nn.Softmax computes it (maximum subtracted), for raw norms that do not
    bound the logits (`clipped`, `no_norm`)."""
    image, words = image.double(), words.double()
    query, context = (words, image) if cfg.direction == "t2i" else (image, words)
    x = context @ query.T  # (S, Q)
    if cfg.raw_feature_norm == "clipped":
        x = torch.where(x > 0, x, 0.1 * x)
    logits = cfg.lambda_softmax * x
    weights = torch.exp(logits - logits.max(0, keepdim=True).values)
    alpha = weights / weights.sum(0, keepdim=True)  # over the context axis
    attended = alpha.T @ context
    r = torch.stack([q @ a / max(float(q.norm() * a.norm()), 1e-8) for q, a in zip(query, attended, strict=True)])
    match cfg.agg_func:
        case "LogSumExp":
            return float(torch.log(torch.exp(cfg.lambda_lse * r).sum()) / cfg.lambda_lse)
        case "Mean":
            return float(r.mean())
        case "Max":
            return float(r.max())
        case "Sum":
            return float(r.sum())
    raise AssertionError


@pytest.mark.parametrize("direction,norm,agg", list(itertools.product(["t2i", "i2t"], ["clipped", "no_norm"], AGGS)))
def test_unbounded_logits_stay_finite_and_match_a_shifted_softmax(direction: str, norm: str, agg: str) -> None:
    # Un-normalised features (no_imgnorm / no_txtnorm): dots of ~1e3, logits of ~1e4, far past exp's float32 range.
    images, captions, lengths = random_case(seed=11)
    images, captions = images * 30.0, captions * 20.0
    cfg = XAttnConfig(direction=direction, raw_feature_norm=norm, agg_func=agg, lambda_softmax=9.0)
    got = xattn_scores(images, captions, lengths, cfg)
    want = torch.tensor([[shifted_softmax_pair(images[i], captions[c, : lengths[c]], cfg)
                          for c in range(len(lengths))] for i in range(len(images))], dtype=torch.float64)
    assert torch.isfinite(want).all()
    assert torch.isfinite(got).all()
    assert (got.double() - want).abs().max().item() <= 1e-4
    with torch.enable_grad():  # the autograd path (training) shifts the same way
        images_g = images.clone().requires_grad_(True)
        again = xattn_scores(images_g, captions, lengths, cfg)
        again.sum().backward()
    torch.testing.assert_close(again.detach(), got, rtol=0, atol=1e-5)
    assert torch.isfinite(images_g.grad).all()
