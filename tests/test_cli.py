"""The CLI: every bad input is one line on stderr and a non-zero exit; the main job runs end to end."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from itmatch.cli import main
from tests.conftest import write_tiny_dataset

SMALL = ["--set", "model.embed_dim=16", "--set", "model.word_dim=8", "--set", "data.batch_size=16",
         "--set", "train.epochs=1"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["-q", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, match: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("itmatch: error: ") and match in lines[0], lines[0]


def _break(root: Path, problem: str) -> None:
    caps = root / "train_caps.txt"
    ims = root / "train_ims.npy"
    match problem:
        case "missing file":
            ims.unlink()
        case "wrong shape":
            np.save(ims, np.zeros((4, 2, 2, 2), dtype=np.float32))
        case "caption count":
            caps.write_text("\n".join(caps.read_text().splitlines()[:-3]) + "\n")
        case "corrupt npy":
            ims.write_bytes(b"\x93NUMPY garbage")
        case "truncated npy":
            ims.write_bytes(ims.read_bytes()[:-100])
        case "empty caption":
            lines = caps.read_text().splitlines()
            lines[7] = ""
            caps.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("problem,match", [
    ("missing file", "missing file"),
    ("wrong shape", "expected float features"),
    ("caption count", "expected exactly 5 lines per image"),
    ("corrupt npy", "not a valid .npy"),
    ("truncated npy", "truncated"),
    ("empty caption", "empty caption"),
])
def test_bad_data_is_one_line(tiny_data: Path, tmp_path: Path, capsys, problem: str, match: str) -> None:
    _break(tiny_data, problem)
    code, _, err = run_cli(capsys, "train", "--preset", "vsepp_synth", "--data", str(tiny_data),
                           "--out", str(tmp_path / "run"), *SMALL)
    assert_one_line_error(code, err, match)
    if problem != "missing file":
        code, out, err = run_cli(capsys, "data", "check", str(tiny_data))
        assert_one_line_error(code, err, match)
        assert "problem:" in out


@pytest.mark.parametrize("argv,match", [
    (["train", "--preset", "no_such_preset"], "unknown preset"),
    (["train", "--preset", "vsepp_synth", "--set", "train.lrr=1"], "unknown key 'lrr'"),
    (["train", "--preset", "vsepp_synth", "--set", "data.path=/nonexistent/dir"], "data directory not found"),
    (["eval", "/nonexistent/model.pt"], "checkpoint not found"),
    (["eval", "/nonexistent/model.pt", "--ci-resamples", "-3"], "--ci-resamples: -3 must be >= 0"),
    (["frobnicate"], "invalid choice"),
    (["train", "--preset", "vsepp_synth", "--bogus-flag"], "unrecognized arguments"),
    (["data", "check", "/nonexistent"], "not found"),
])
def test_bad_arguments_are_one_line(capsys, argv: list[str], match: str) -> None:
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, match)


def test_corrupt_checkpoint_is_one_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "model_best.pt"
    bad.write_bytes(b"definitely not a checkpoint")
    code, _, err = run_cli(capsys, "eval", str(bad))
    assert_one_line_error(code, err, "not a readable itmatch checkpoint")


def test_no_traceback_from_the_installed_command(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "itmatch.cli", "eval", str(tmp_path / "x.pt")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"itmatch: error: checkpoint not found: {tmp_path / 'x.pt'}"]


def test_data_check_passes_on_good_data(tiny_data: Path, capsys) -> None:
    code, out, _ = run_cli(capsys, "data", "check", str(tiny_data))
    assert code == 0 and "OK" in out and "train: 40 images" in out


def test_data_check_finds_nan(tiny_data: Path, capsys) -> None:
    feats = np.load(tiny_data / "dev_ims.npy")
    feats[3, 1, 2] = np.nan
    np.save(tiny_data / "dev_ims.npy", feats)
    code, out, err = run_cli(capsys, "data", "check", str(tiny_data))
    assert_one_line_error(code, err, "non-finite value (NaN/inf) in image row 3")


def test_train_then_eval_ensemble_and_report(tiny_data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code, text, _ = run_cli(capsys, "train", "--preset", "vsepp_synth", "--data", str(tiny_data),
                            "--out", str(out), *SMALL)
    assert code == 0 and "trained 1 epochs" in text
    ckpt = str(out / "model_best.pt")
    code, text, _ = run_cli(capsys, "eval", ckpt, "--split", "test", "--out", str(tmp_path / "r.json"),
                            "--plot", str(tmp_path / "r.png"), "--ci")
    assert code == 0 and "rsum" in text and "95% CI R@1 " in text and "bootstrap interval" in text
    single = json.loads((tmp_path / "r.json").read_text())
    assert single["n_images"] == 10 and (tmp_path / "r.png").stat().st_size > 1000
    assert single["ci"]["resamples"] == 1000 and single["ci"]["rsum"][0] <= single["rsum"] <= single["ci"]["rsum"][1]
    code, text, _ = run_cli(capsys, "eval", ckpt, ckpt, "--out", str(tmp_path / "e.json"))
    ensemble = json.loads((tmp_path / "e.json").read_text())
    assert ensemble["rsum"] == pytest.approx(single["rsum"])  # the mean of identical matrices is the matrix


def test_presets_lists_every_file(capsys) -> None:
    from itmatch.config import list_presets

    code, out, _ = run_cli(capsys, "presets")
    assert code == 0 and all(name in out for name in list_presets())


def test_vocab_command_writes_the_original_format(tmp_path: Path, capsys) -> None:
    root = write_tiny_dataset(tmp_path / "v", {"train": 4, "dev": 2})
    (root / "vocab.json").unlink()
    code, _, _ = run_cli(capsys, "data", "vocab", str(root), "--threshold", "1")
    raw = json.loads((root / "vocab.json").read_text())
    assert code == 0 and set(raw) == {"word2idx", "idx2word", "idx"}
    assert raw["word2idx"]["<pad>"] == 0 and raw["idx2word"]["3"] == "<unk>"


def test_python_m_itmatch_runs_the_cli() -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "itmatch", "presets"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "vsepp_synth" in proc.stdout
