"""The collapse guard (`train.collapse_guard`): its signals against hand-computed values, and a collapse provoked on
purpose (VSE++ with hardest negatives from step 0 and a large lr on the synthetic data) in each mode."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from itmatch.collapse import chance_rsum, collapse_signals, collapse_value, is_collapsed
from itmatch.losses import hinge_loss

B, MARGIN = 32, 0.2


def test_the_collapse_value_is_the_hardest_negative_loss_of_equal_similarities() -> None:
    sims = torch.full((7, 7), 0.37)
    assert float(hinge_loss(sims, margin=0.3, max_violation=True)) == pytest.approx(collapse_value(7, 0.3))
    assert collapse_value(7, 0.3) == pytest.approx(2 * 7 * 0.3)
    signals = collapse_signals(sims, 0.3)
    assert signals == pytest.approx({"pinned": 1.0, "violating": 1.0, "spread": 0.0}, abs=1e-6)
    assert is_collapsed(signals, 0.3)


def test_separated_pairs_give_no_collapse_signal() -> None:
    sims = torch.eye(6)  # positives 1, negatives 0: nothing violates a 0.2 margin
    signals = collapse_signals(sims, 0.2)
    assert signals["pinned"] == 0.0 and signals["violating"] == 0.0 and signals["spread"] > 0.3
    assert not is_collapsed(signals, 0.2)
    # One negative per row within the margin (0.9 vs 1.0): 6 of 30 per direction violate.
    sims = torch.eye(6) + 0.9 * torch.roll(torch.eye(6), 1, dims=1)
    assert collapse_signals(sims, 0.2)["violating"] == pytest.approx(12 / 60)


def test_chance_rsum_by_hand_and_by_random_rankings() -> None:
    # 2 images, 10 captions: t2i R@1 = 1/2, R@5 = R@10 = 1; i2t R@1 = 1 - 5/10, R@5 = 1 - 1/C(10,5), R@10 = 1.
    assert chance_rsum(2) == pytest.approx(100 * (0.5 + 1 + 1 + 0.5 + (1 - 1 / 252) + 1))
    from itmatch.evaluation import evaluate_sims

    rng = np.random.default_rng(0)
    rsums = [evaluate_sims(rng.random((30, 150)))["rsum"] for _ in range(300)]
    assert np.mean(rsums) == pytest.approx(chance_rsum(30), rel=0.05)


def _cfg(data: Path, mode: str, *extra: str):
    from itmatch.config import load_preset

    return load_preset("vsepp_synth", [
        "data.batch_size=32", "train.epochs=3", "model.embed_dim=32", "model.word_dim=16", "train.lr=0.005",
        "train.max_violation=true", f"train.collapse_guard={json.dumps(mode)}", "train.collapse_patience=5",
        f"data.path={json.dumps(str(data))}", *extra])


def _run(data: Path, out: Path, mode: str) -> tuple[list[float], dict]:
    from itmatch.training import fit

    losses: list[float] = []
    summary = fit(_cfg(data, mode), out, on_step=lambda state, stats: losses.append(stats["loss"]))
    return losses, summary


def test_each_mode_on_a_provoked_collapse(synth_data: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="itmatch.collapse"):
        warn_losses, warn = _run(synth_data, tmp_path / "warn", "warn")
    # The collapse happened: the hardest-negative loss of the last batches sits at 2 * B * margin.
    last = warn_losses[-10:-1]  # (the epoch's last batch is smaller)
    assert all(abs(x / collapse_value(B, MARGIN) - 1) < 0.05 for x in last), last
    warnings = [r.getMessage() for r in caplog.records if r.name == "itmatch.collapse"]
    assert warnings and "collapse value 2*B*margin" in warnings[0] and "train.max_violation=false" in warnings[0]
    assert sum("2*B*margin" in w for w in warnings) == 1, "one line per signal, not one per step"
    assert not any("event" in h for h in warn["history"]), "warn changes nothing in the run"

    off_losses, off = _run(synth_data, tmp_path / "off", "off")
    assert off_losses == warn_losses and off["history"] == warn["history"], "warn and off train identically"

    fb_losses, fb = _run(synth_data, tmp_path / "fallback", "fallback")
    events = [h for h in fb["history"] if "event" in h]
    assert events and events[0]["event"].startswith("collapse:loss_pinned:vse0_until_")
    first = events[0]["step"]
    assert fb_losses[:first] == warn_losses[:first], "identical until the guard acts"
    # The next step uses VSE0: the sum over the B - 1 negatives of both directions, far above the pinned value.
    assert fb_losses[first] > 10 * collapse_value(B, MARGIN)
    # After the fallback epoch, hardest negatives again (their loss is back below ~3 x the collapse value).
    until = int(events[0]["event"].rsplit("_", 1)[1])
    assert fb_losses[until] < 3 * collapse_value(B, MARGIN)
    best = lambda s: max(h["rsum"] for h in s["history"] if "rsum" in h)  # noqa: E731
    assert best(fb) > best(warn) + 15, (best(fb), best(warn))

    from itmatch.checkpoints import native

    saved = native.load(tmp_path / "fallback" / "checkpoint.pt")
    assert saved["collapse_guard"]["fallbacks"] == len(events)
    assert (tmp_path / "fallback" / "tb").is_dir()


def test_a_run_resumed_inside_a_fallback_replays_it_exactly(synth_data: Path, tmp_path: Path) -> None:
    from tests.conftest import crash_and_resume

    cfg = _cfg(synth_data, "fallback", "train.save_every=10", "train.epochs=2")
    crashed, ref, run = crash_and_resume(cfg, tmp_path, crash_at=45)
    guard = crashed["collapse_guard"]
    assert guard["fallbacks"] == 1 and guard["fallback_until"] > crashed["state"]["global_step"], guard
    assert ref["collapse_guard"] == run["collapse_guard"]
    assert any("event" in h for h in ref["history"])
