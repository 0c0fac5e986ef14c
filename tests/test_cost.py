"""Eval cost known before it starts: the calibrated estimate against a measured run, dry runs, the memory refusal."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from itmatch import create_model
from itmatch.cost import DryRunFinished, ScoringCost, check_memory, estimate_scoring, eval_planner
from itmatch.errors import ItmatchError
from itmatch.inference import similarity_matrix
from itmatch.models.base import Encoded
from itmatch.models.scan import ScanConfig
from tests.test_cli import SMALL, assert_one_line_error, run_cli


def _gallery(n_images: int, n_captions: int, dim: int) -> tuple[Encoded, Encoded]:
    gen = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(n_images, 36, dim, generator=gen), dim=-1)
    lengths = torch.randint(8, 20, (n_captions,), generator=gen)
    packed = F.normalize(torch.randn(int(lengths.sum()), dim, generator=gen), dim=-1)
    return Encoded(images), Encoded(packed, lengths, torch.cumsum(lengths, 0) - lengths)


def test_estimate_is_within_2x_of_the_measured_scoring_time() -> None:
    model = create_model(ScanConfig(image_dim=8, embed_dim=256, word_dim=8, vocab_size=10)).eval()
    images, texts = _gallery(256, 1280, 256)
    cost = estimate_scoring(model, images, texts, dtype=torch.float32)
    assert cost.pairs == 256 * 1280 and cost.calibration_pairs < cost.pairs / 10  # a small sample was timed
    start = time.perf_counter()
    similarity_matrix(model, images, texts, dtype=torch.float32, chunk=64)
    measured = time.perf_counter() - start
    assert measured > 0.3, "the run must be long enough to time"
    assert measured / 2 <= cost.seconds <= measured * 2, (cost.seconds, measured)
    result_mb = 256 * 1280 * 8 / 2**20
    assert cost.result_mb == pytest.approx(result_mb) and cost.peak_mb > result_mb


def _cost(peak_mb: float, tile_mb: float = 10.0) -> ScoringCost:
    return ScoringCost(pairs=10, seconds=1.0, peak_mb=peak_mb, calibration_pairs=1, calibration_s=0.1,
                       result_mb=1.0, tile_mb=tile_mb)


def test_memory_check_refuses_in_one_line_naming_what_fits() -> None:
    check_memory(_cost(900.0), available_mb=1000.0, dtype=torch.float64)  # fits: no error
    with pytest.raises(ItmatchError) as err:
        check_memory(_cost(3000.0, tile_mb=1024.0), available_mb=1000.0, dtype=torch.float64)
    line = str(err.value)
    assert "\n" not in line and "2.9 GB" in line and "--memory-budget 256" in line and "--dtype float32" in line
    with pytest.raises(ItmatchError, match="--fold5"):  # float32, small tiles: only fewer pairs help
        check_memory(_cost(3000.0), available_mb=1000.0, dtype=torch.float32)


def test_planner_lets_dot_product_models_through_and_stops_dry_runs() -> None:
    seen: list[str] = []
    plan = eval_planner(None, dry_run=False, report=seen.append)
    assert plan(Encoded(torch.ones(3, 4)), Encoded(torch.ones(5, 4)), torch.float32, 15) is None and not seen
    with pytest.raises(DryRunFinished):
        eval_planner(None, dry_run=True, report=seen.append)(Encoded(torch.ones(3, 4)), Encoded(torch.ones(5, 4)),
                                                             torch.float32, 15)
    assert "15 pairs" in seen[0]


@pytest.fixture
def scan_ckpt(tiny_data: Path, tmp_path: Path, capsys) -> str:
    out = tmp_path / "run"
    code, _, _ = run_cli(capsys, "train", "--preset", "scan_synth_t2i_avg", "--data", str(tiny_data), "--out",
                         str(out), *SMALL)
    assert code == 0
    return str(out / "model_best.pt")


def test_eval_prints_the_estimate_and_dry_run_scores_nothing(scan_ckpt: str, tmp_path: Path, capsys) -> None:
    code, out, _ = run_cli(capsys, "eval", scan_ckpt, "--split", "test", "--dry-run",
                           "--out", str(tmp_path / "r.json"))
    assert code == 0 and "estimated scoring cost: 500 pairs" in out and "dry run: nothing scored" in out
    assert "rsum" not in out and not (tmp_path / "r.json").exists()
    code, out, _ = run_cli(capsys, "eval", scan_ckpt, "--split", "test")
    assert code == 0 and "estimated scoring cost: 500 pairs" in out and "rsum" in out


def test_eval_refuses_when_the_estimate_exceeds_available_memory(scan_ckpt: str, capsys, monkeypatch) -> None:
    monkeypatch.setattr("itmatch.cost.mem_available_mb", lambda: 1.0)
    code, _, err = run_cli(capsys, "eval", scan_ckpt, "--split", "test", "--dtype", "float64")
    assert_one_line_error(code, err, "GB is available; try --dtype float32")
