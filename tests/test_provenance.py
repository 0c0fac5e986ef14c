"""Provenance records (`itmatch.provenance`): the git state, the data fingerprints, and their presence in every
checkpoint and results JSON."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from itmatch import provenance as prov

SRC = Path(prov.__file__).resolve().parent


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(SRC), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_git_state_is_the_checkout_of_the_sources(monkeypatch) -> None:
    prov.git_state.cache_clear()
    try:
        expected = {"commit": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain", "-uno"))}
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("the sources are not in a git checkout")
    assert prov.git_state() == expected
    prov.git_state.cache_clear()
    monkeypatch.setenv("PATH", "/nonexistent")  # no git: null, not an error
    assert prov.git_state() is None
    prov.git_state.cache_clear()


def test_fingerprints_hash_whole_files_and_sample_large_ones(tmp_path: Path, monkeypatch) -> None:
    small = tmp_path / "test_caps.txt"
    small.write_bytes(b"a red cube .\n" * 100)
    assert prov.fingerprint(small) == {"size": 1300, "sha256": hashlib.sha256(small.read_bytes()).hexdigest()}
    monkeypatch.setattr(prov, "FULL_HASH_BYTES", 100)
    monkeypatch.setattr(prov, "SAMPLE_BYTES", 10)
    big = tmp_path / "test_ims.npy"
    data = bytes(range(256)) * 4
    big.write_bytes(data)
    n = len(data)
    want = hashlib.sha256(str(n).encode() + data[:10] + data[n // 2 - 5 : n // 2 + 5] + data[n - 10 :]).hexdigest()
    assert prov.fingerprint(big) == {"size": n, "sha256": want, "sampled": True}
    (tmp_path / "train_ims.npy").write_bytes(b"x")
    (tmp_path / "vocab.json").write_text("{}")
    assert sorted(prov.data_fingerprint(tmp_path, "test")["files"]) == ["test_caps.txt", "test_ims.npy", "vocab.json"]


def test_checkpoints_and_eval_results_carry_provenance(tiny_data: Path, tmp_path: Path, capsys) -> None:
    from itmatch.checkpoints import native
    from itmatch.cli import main
    from itmatch.config import config_from_dict

    out = tmp_path / "run"
    assert main(["-q", "train", "--preset", "vsepp_synth", "--data", str(tiny_data), "--out", str(out),
                 "--set", "model.embed_dim=16", "--set", "model.word_dim=8", "--set", "data.batch_size=16",
                 "--set", "train.epochs=1"]) == 0
    for name in ("checkpoint.pt", "model_best.pt"):
        saved = native.load(out / name)
        p = saved["provenance"]
        assert p["config"] == saved["config"] and config_from_dict(p["config"]).train.epochs == 1
        assert p["protocol"] == {"split": "train", "n_images": 40, "n_captions": 200, "fold5": None}
        assert p["data"]["files"]["train_ims.npy"]["sha256"] == hashlib.sha256(
            (tiny_data / "train_ims.npy").read_bytes()).hexdigest()
        assert p["torch"] and p["numpy"] and p["device"] == "cpu" and p["dtype"] == "float32"
    assert main(["-q", "eval", str(out / "model_best.pt"), "--out", str(tmp_path / "r.json")]) == 0
    p = json.loads((tmp_path / "r.json").read_text())["provenance"]
    assert p["protocol"] == {"split": "test", "n_images": 10, "n_captions": 50, "fold5": False}
    assert set(p["data"]["files"]) == {"test_ims.npy", "test_caps.txt", "test_ids.txt", "vocab.json"}
    assert p["config"] == [native.load(out / "model_best.pt")["config"]]
    assert "git" in p and p["itmatch"]
