"""Evaluation in tiles of images x captions: over torchrun ranks, resumable from tiles on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from itmatch.sharded import plan_tiles, sharded_sims


@pytest.mark.parametrize(("n", "folds", "ti", "tc"), [(10, 0, 3, 7), (10, 5, 1, 4), (10, 0, 1024, 0), (10, 5, 5, 0)])
def test_tiles_cover_every_scored_pair_once(n: int, folds: int, ti: int, tc: int) -> None:
    covered = np.zeros((folds or 1, n // (folds or 1), 5 * n // (folds or 1)), dtype=int)
    tiles = plan_tiles(n, 5 * n, folds=folds, tile_images=ti, tile_captions=tc)
    assert [t.index for t in tiles] == list(range(len(tiles)))
    for t in tiles:
        covered[t.block, t.image_start : t.image_stop, t.caption_start : t.caption_stop] += 1
    assert (covered == 1).all()


def _model(data: Path, preset: str):
    from itmatch.training import build_model, open_split, resolve_config
    from tests.ddp_worker import tiny_config

    cfg, _, tokenizer = resolve_config(tiny_config(str(data), preset=preset))
    torch.manual_seed(0)
    return build_model(cfg), open_split(cfg, data, "test"), tokenizer


@pytest.mark.parametrize("preset", ["vsepp_synth", "scan_synth_t2i_avg"])
def test_tiles_give_the_matrix_of_one_process(tiny_data: Path, preset: str) -> None:
    """The default geometry reproduces compute_sims / compute_fold_sims bit for bit; small tiles to 1e-12."""
    from itmatch.inference import compute_fold_sims, compute_sims

    model, split, tokenizer = _model(tiny_data, preset)
    full, folds = compute_sims(model, split, tokenizer), compute_fold_sims(model, split, tokenizer)
    sims, stats = sharded_sims(model, split, tokenizer)
    assert stats.tiles == stats.scored == 1 and np.array_equal(sims, full)
    sims, _ = sharded_sims(model, split, tokenizer, fold5=True)
    assert np.array_equal(sims, folds)
    sims, stats = sharded_sims(model, split, tokenizer, tile_images=3, tile_captions=7)
    assert stats.scored == 4 * 8
    np.testing.assert_allclose(sims, full, rtol=1e-12, atol=1e-12)
    sims, stats = sharded_sims(model, split, tokenizer, fold5=True, tile_images=1, tile_captions=4)
    assert stats.scored == 5 * 2 * 3
    np.testing.assert_allclose(sims, folds, rtol=1e-12, atol=1e-12)


def test_an_interrupted_evaluation_resumes_from_its_tiles_and_a_changed_model_starts_over(
        tiny_data: Path, tmp_path: Path) -> None:
    from itmatch.inference import compute_sims

    model, split, tokenizer = _model(tiny_data, "scan_synth_t2i_avg")
    full = compute_sims(model, split, tokenizer)
    geometry = {"tiles_dir": tmp_path / "tiles", "tile_images": 3, "tile_captions": 20}  # 4 x 3 tiles

    class Interrupted(Exception):
        pass

    def interrupt(tile) -> None:
        if tile.index == 4:
            raise Interrupted

    with pytest.raises(Interrupted):
        sharded_sims(model, split, tokenizer, on_tile=interrupt, **geometry)
    scored: list[int] = []
    sims, stats = sharded_sims(model, split, tokenizer, on_tile=lambda t: scored.append(t.index), **geometry)
    assert (stats.tiles, stats.reused, stats.scored) == (12, 5, 7)  # tiles 0-4 were kept, 5-11 scored now
    assert scored == list(range(5, 12))
    np.testing.assert_allclose(sims, full, rtol=1e-12, atol=1e-12)
    _, stats = sharded_sims(model, split, tokenizer, **geometry)
    assert (stats.reused, stats.scored) == (12, 0)

    with torch.no_grad():  # another model: none of the tiles apply
        weight = next(model.parameters())
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    changed = compute_sims(model, split, tokenizer)
    assert np.abs(changed - full).max() > 1e-3
    sims, stats = sharded_sims(model, split, tokenizer, **geometry)
    assert (stats.reused, stats.scored) == (0, 12)
    np.testing.assert_allclose(sims, changed, rtol=1e-12, atol=1e-12)
    _, stats = sharded_sims(model, split, tokenizer, **{**geometry, "tile_captions": 10})  # another geometry
    assert (stats.reused, stats.scored) == (0, 20)


def _checkpoint(data: Path, out: Path, preset: str) -> str:
    from itmatch.training import CHECKPOINT, fit
    from tests.ddp_worker import tiny_config

    fit(tiny_config(str(data), "train.max_steps=2", preset=preset), out)
    return str(out / CHECKPOINT)


@pytest.mark.slow
def test_torchrun_eval_equals_one_process_for_an_ensemble(tiny_data: Path, tmp_path: Path, capsys) -> None:
    """Two gloo ranks split the tiles of a SCAN + VSE++ ensemble; rank 0 alone reports the numbers of one process.
    (Fold-5 tiles: test_tiles_give_the_matrix_of_one_process; one launch keeps this test short.)"""
    from itmatch.cli import main

    ckpts = [_checkpoint(tiny_data, tmp_path / "scan", "scan_synth_t2i_avg"),
             _checkpoint(tiny_data, tmp_path / "vsepp", "vsepp_synth")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert main(["-q", "eval", *ckpts, "--split", "test", "--out", str(one)]) == 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "itmatch", "-q", "eval", *ckpts, "--split", "test", "--out", str(two),
                           "--tile-images", "2", "--tile-captions", "5", "--tiles-dir", str(tmp_path / "t")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert proc.stdout.count("rsum") == 1  # rank 0 alone reports
    results = [json.loads(path.read_text()) for path in (two, one)]
    for r in results:  # the provenance records when each run ended
        assert r["provenance"].pop("created")
    assert results[0] == results[1]
    assert len(list((tmp_path / "t").glob("*/*.npy"))) == 2 * 5 * 10  # per model 5 x 10 tiles, both ranks' kept
    capsys.readouterr()
