"""Training loop: resume is bit-identical, checkpoints are atomic, a NaN loss stops cleanly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from itmatch.checkpoints import native
from itmatch.config import load_preset
from itmatch.errors import CheckpointError, ConfigError, TrainingError
from itmatch.training import BEST, CHECKPOINT, fit
from tests.conftest import crash_and_resume

SMALL = ["model.embed_dim=16", "model.word_dim=8", "data.batch_size=16", "train.epochs=3", "train.lr_update=2",
         "train.lr=1e-3"]


def small_cfg(data: Path, *extra: str):
    return load_preset("vsepp_synth", [f"data.path={json.dumps(str(data))}", *SMALL, *extra])


def test_resume_after_a_crash_is_bit_identical(tiny_data: Path, tmp_path: Path) -> None:
    cfg = small_cfg(tiny_data, "train.save_every=5")
    # 13 steps per epoch: step 17 is mid-epoch 2, after the checkpoint of step 15
    crashed, _, _ = crash_and_resume(cfg, tmp_path, crash_at=17)
    assert crashed["state"]["global_step"] == 15 and crashed["state"]["epoch"] == 1
    with pytest.raises(ConfigError, match="--resume"):
        fit(cfg, tmp_path / "run")
    assert (tmp_path / "run" / BEST).is_file()


@pytest.mark.slow
def test_training_killed_with_sigkill_resumes_to_the_same_metrics(tiny_data: Path, tmp_path: Path) -> None:
    sets = [a for s in [*SMALL, "train.save_every=3", "train.epochs=4"] for a in ("--set", s)]
    base = [sys.executable, "-m", "itmatch.cli", "-q", "train", "--preset", "vsepp_synth", "--data", str(tiny_data)]
    ref = tmp_path / "ref"
    subprocess.run([*base, *sets, "--out", str(ref)], check=True, capture_output=True)
    run = tmp_path / "run"
    proc = subprocess.Popen([*base, *sets, "--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / CHECKPOINT).exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / CHECKPOINT).exists(), "no checkpoint was written before the kill"
    done = native.load(run / CHECKPOINT)["state"]["global_step"]
    subprocess.run([*base[:4], "train", "--resume", "--out", str(run)], check=True, capture_output=True)
    assert native.load(run / CHECKPOINT)["history"] == native.load(ref / CHECKPOINT)["history"], done


def test_a_checkpoint_write_that_dies_leaves_the_previous_one(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "checkpoint.pt"
    native.save({"value": torch.tensor([1.0])}, path)

    def dying_save(obj, fh) -> None:
        fh.write(b"PK\x03\x04 partial zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        native.save({"value": torch.tensor([2.0])}, path)
    monkeypatch.undo()
    assert native.load(path)["value"].item() == 1.0
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"], "a temporary file was left behind"


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    cfg = small_cfg(tiny_data, "train.save_every=4")
    poison = {"on": False}
    from itmatch.recipe import Recipe

    original = Recipe.loss

    def loss_with_nan(self, *args, **kwargs):
        terms = original(self, *args, **kwargs)
        if poison["on"]:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    def arm(state, stats) -> None:
        if state.global_step == 5:
            poison["on"] = True

    Recipe.loss = loss_with_nan
    try:
        with pytest.raises(TrainingError, match="loss became nan at epoch 1 step 6") as info:
            fit(cfg, tmp_path / "run", on_step=arm)
    finally:
        Recipe.loss = original
    assert "\n" not in str(info.value)
    saved = native.load(tmp_path / "run" / CHECKPOINT)
    assert saved["state"]["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_corrupt_checkpoints_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a readable itmatch checkpoint"):
        native.load(bad)
    good = tmp_path / "good.pt"
    native.save({"x": torch.ones(1000)}, good)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[:-500])
    with pytest.raises(CheckpointError):
        native.load(trunc)
    torch.save({"x": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an itmatch checkpoint"):
        native.load(tmp_path / "foreign.pt")
