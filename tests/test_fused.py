"""Compiled cross-attention kernels (`itmatch.modules.fused`): the same scores as the eager code, chosen by size and
`ITMATCH_COMPILE`, eager whenever autograd is on or compiling fails."""

from __future__ import annotations

import logging

import pytest
import torch

from itmatch.errors import ConfigError
from itmatch.modules import cross_attention as xa
from itmatch.modules import fused
from itmatch.modules.cross_attention import XAttnConfig, xattn_similarity


def _inputs(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(7, 5, 16, generator=g, dtype=dtype)
    lengths = torch.tensor([6, 1, 4, 6, 3, 5, 2, 6, 1])
    captions = torch.randn(len(lengths), 6, 16, generator=g, dtype=dtype)
    return images, captions, lengths


def _naive(images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, cfg: XAttnConfig) -> torch.Tensor:
    """Per pair, written from the spec: the oracle both kernels answer to."""
    out = torch.empty(len(images), len(lengths), dtype=images.dtype)
    for i, regions in enumerate(images):
        for c, n in enumerate(lengths.tolist()):
            words = captions[c, :n]
            query, context = (words, regions) if cfg.direction == "t2i" else (regions, words)
            raw = context @ query.T  # (context, query)
            raw = torch.nn.functional.leaky_relu(raw, 0.1) if cfg.raw_feature_norm.startswith("clipped") else raw
            if cfg.raw_feature_norm in ("clipped_l2norm", "l2norm"):
                raw = raw / (raw.norm(dim=1, keepdim=True) + cfg.eps)
            alpha = torch.softmax(raw * cfg.lambda_softmax, dim=0)
            attended = alpha.T @ context  # (query, d)
            cos = (query * attended).sum(1) / (query.norm(dim=1) * attended.norm(dim=1)).clamp(min=cfg.eps)
            out[i, c] = {"LogSumExp": lambda r: torch.log(torch.exp(r * cfg.lambda_lse).sum()) / cfg.lambda_lse,
                         "Mean": torch.mean, "Max": torch.max, "Sum": torch.sum}[cfg.agg_func](cos)
    return out


CONFIGS = [
    XAttnConfig(direction="t2i", agg_func="LogSumExp", lambda_softmax=9.0, lambda_lse=6.0),
    XAttnConfig(direction="i2t", agg_func="Mean", lambda_softmax=4.0),
    XAttnConfig(direction="t2i", raw_feature_norm="no_norm", agg_func="Max", lambda_softmax=3.0),
    XAttnConfig(direction="i2t", raw_feature_norm="clipped", agg_func="Sum", lambda_softmax=2.0),
]


@pytest.mark.slow
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.direction}-{c.raw_feature_norm}-{c.agg_func}")
def test_compiled_scores_equal_the_eager_ones(cfg: XAttnConfig, monkeypatch) -> None:
    calls = []
    kernel = fused.Fused(_counting(xa._pool_attended, calls))
    monkeypatch.setattr(xa, "_FUSED_POOL", kernel)
    # One compilation per configuration and dtype: float64 for one of them keeps a test process below PyTorch's
    # recompilation limit (8 per function), past which it would run the eager code (caught by `calls` below).
    dtypes = ((torch.float32, 1e-6), (torch.float64, 1e-12)) if cfg is CONFIGS[0] else ((torch.float32, 1e-6),)
    for dtype, tol in dtypes:
        images, captions, lengths = _inputs(dtype)
        with torch.no_grad():
            monkeypatch.setenv(fused.ENV, "off")
            eager = xattn_similarity(images, captions, lengths, cfg, budget_mb=0.01)
            monkeypatch.setenv(fused.ENV, "on")
            compiled = xattn_similarity(images, captions, lengths, cfg, budget_mb=0.01)
        assert kernel._compiled is not None and not kernel._failed, "the compiled kernel ran"
        assert (compiled - eager).abs().max() <= tol
        assert (compiled - _naive(images, captions, lengths, cfg)).abs().max() <= 10 * tol
    assert calls == [], "the compiled path never ran the eager function"


def _counting(fn, calls: list):
    """`fn`, counting the calls that run eagerly (PyTorch's fallback past its recompilation limit)."""
    def wrapped(*args, **kwargs):
        if not torch.compiler.is_compiling():
            calls.append(1)
        return fn(*args, **kwargs)
    wrapped.__name__ = fn.__name__
    return wrapped


def test_the_choice_follows_size_autograd_and_the_environment(monkeypatch) -> None:
    monkeypatch.delenv(fused.ENV, raising=False)
    assert fused.use_fused(fused.MIN_ELEMENTS, False) and not fused.use_fused(fused.MIN_ELEMENTS - 1, False)
    monkeypatch.setenv(fused.ENV, "off")
    assert not fused.use_fused(10 * fused.MIN_ELEMENTS, False)
    monkeypatch.setenv(fused.ENV, "ON")
    assert fused.use_fused(1, False)
    assert not fused.use_fused(10 * fused.MIN_ELEMENTS, True), "training stays eager"
    monkeypatch.setenv(fused.ENV, "sometimes")
    with pytest.raises(ConfigError, match="ITMATCH_COMPILE='sometimes' is not one of auto, on, off"):
        fused.use_fused(1, False)


def test_training_never_runs_the_compiled_kernel(monkeypatch) -> None:
    monkeypatch.setenv(fused.ENV, "on")
    kernel = fused.Fused(xa._pool_attended)
    monkeypatch.setattr(xa, "_FUSED_POOL", kernel)
    images, captions, lengths = _inputs(torch.float32)
    images.requires_grad_(True)
    xattn_similarity(images, captions, lengths, CONFIGS[0]).sum().backward()
    assert images.grad is not None and kernel._compiled is None


def test_a_failing_compiler_falls_back_to_the_eager_kernel_once(monkeypatch, caplog) -> None:
    def broken(fn, **_kw):
        def run(*_a, **_k):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    kernel = fused.Fused(lambda x: x * 2)
    with caplog.at_level(logging.WARNING, logger="itmatch.modules.fused"):
        assert kernel(torch.tensor(3.0)) == 6.0
        assert kernel(torch.tensor(4.0)) == 8.0
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0] and "more detail" not in warnings[0]
