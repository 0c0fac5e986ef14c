"""Pinned outputs: every method's similarity matrix on fixed seeded weights and data, and the training trajectory of
every synthetic preset. A refactor changes no number: these are compared bit for bit (CPU, one thread).

`ITMATCH_WRITE_PINS=1 pytest tests/test_pins.py` rewrites the files in tests/pins/ (only when a change of numbers
is intended, and said so in the commit).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

PINS = Path(__file__).parent / "pins"
WRITE = os.environ.get("ITMATCH_WRITE_PINS") == "1"

# Synthetic presets with overrides that keep them small; each trains 2 epochs of 5 steps.
SMALL = ["data.batch_size=20", "data.train_images=20", "train.epochs=2", "model.embed_dim=32"]
PRESETS = {
    "vsepp_synth": ["model.word_dim=16"],
    "scan_synth_t2i_avg": ["model.word_dim=16"],
    "gsmn_synth_sparse": ["model.word_dim=16"],
    "vse_infinity_synth_bigru": ["model.word_dim=16"],
    "vse_infinity_synth_minilm": [],
    "hrem_synth_minilm": ["model.warmup_iterations=3", "model.nhead=4"],
    "vsrn_synth": ["model.word_dim=16", "model.caption_hidden=16", "model.caption_word_dim=8", "train.val_every=3"],
    "vse_infinity_synth_grid": ["model.word_dim=16", "data.batch_size=10", "data.train_images=10"],
}


def _compare(name: str, value: dict | np.ndarray) -> None:
    if isinstance(value, np.ndarray):
        path = PINS / f"sims_{name}.npy"
        if WRITE:
            PINS.mkdir(exist_ok=True)
            np.save(path, value)
        np.testing.assert_array_equal(value, np.load(path), err_msg=f"{name}: similarities moved")
    else:
        path = PINS / f"trajectory_{name}.json"
        if WRITE:
            PINS.mkdir(exist_ok=True)
            path.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
        assert value == json.loads(path.read_text(encoding="utf-8")), f"{name}: training trajectory moved"


def _preset(name: str, data: Path, bert: Path):
    from itmatch.config import load_preset

    overrides = [*SMALL, *PRESETS[name], f"data.path={json.dumps(str(data))}"]
    if "minilm" in name:
        overrides.append(f"model.bert_path={json.dumps(str(bert))}")
    return load_preset(name, overrides)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_training_trajectory_and_similarities_are_pinned(name: str, pin_data: Path, tiny_bert: Path,
                                                          tmp_path: Path) -> None:
    from itmatch.training import fit

    cfg = _preset(name, pin_data, tiny_bert)
    steps: list[dict] = []
    summary = fit(cfg, tmp_path / "run", on_step=lambda state, stats: steps.append(
        {"step": state.global_step, **{k: float(v) for k, v in stats.items()}}))
    assert len(steps) == 10, "two epochs of 5 steps each"
    _compare(name, {"steps": steps, "history": summary["history"], "best_epoch": summary["best_epoch"]})

    from itmatch.checkpoints.loader import load_model
    from itmatch.inference import compute_sims
    from itmatch.training import open_split

    loaded = load_model(tmp_path / "run" / "model_best.pt")
    split = open_split(loaded.config, Path(loaded.config.data.path), "test")
    sims = compute_sims(loaded.model, split, loaded.vocab)
    assert sims.shape == (10, 50) and np.isfinite(sims).all()
    _compare(name, sims)


def test_pins_cover_every_registered_method() -> None:
    from itmatch.config import load_preset
    from itmatch.registry import list_models

    assert {load_preset(p).model.name for p in PRESETS} == set(list_models())
    if not WRITE:
        assert len(list(PINS.glob("sims_*.npy"))) == len(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_method_steps_with_the_fused_optimizer(name: str, pin_data: Path, tiny_bert: Path) -> None:
    """The pins above are the fused Adam/AdamW's trajectories; the per-tensor loop (torch's CPU default) would move
    them by rounding and cost 4-6x the optimizer time."""
    from itmatch.training import build_model, build_recipe, resolve_config

    cfg, _, _ = resolve_config(_preset(name, pin_data, tiny_bert))
    optimizer = build_recipe(build_model(cfg), cfg).optimizer(1e-3)
    assert type(optimizer).__name__ in ("Adam", "AdamW")
    assert optimizer.param_groups and all(group["fused"] for group in optimizer.param_groups)
