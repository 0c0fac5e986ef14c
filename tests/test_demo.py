"""The demo (`itmatch.demo`, `itmatch demo`): one line per epoch without a terminal, the report with the retrieval
picture, and the choice of queries it shows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np


def test_pick_queries_shows_successes_then_one_failure() -> None:
    from itmatch.demo import pick_queries

    n = 8
    sims = np.zeros((n, 5 * n))
    for c in range(5 * n):
        sims[c // 5, c] = 1.0  # every caption finds its image ...
    for c in (7, 23):  # ... but these two: their image is scored last
        sims[:, c] = np.arange(n)[::-1] / 10 + 0.5
        sims[c // 5, c] = -1.0
    chosen = pick_queries(sims, n=4)
    assert len(chosen) == 4 and chosen[-1] in (7, 23)
    assert all(c not in (7, 23) for c in chosen[:-1])
    assert len({c // 5 for c in chosen}) == 4, "distinct images"
    assert pick_queries(sims, n=4) == chosen, "seeded"
    assert all(c not in (7, 23) for c in pick_queries(np.eye(n).repeat(5, axis=1), n=3)), "no failure to show"


def test_the_demo_prints_epoch_lines_and_draws_its_report(synth_data: Path, tmp_path: Path, capsys) -> None:
    from itmatch.cli import main

    out = tmp_path / "demo"
    sets = ["model.embed_dim=32", "model.word_dim=16", "data.batch_size=32", "train.epochs=2", "data.train_images=0"]
    code = main(["demo", "--data", str(synth_data), "--out", str(out), *[a for s in sets for a in ("--set", s)]])
    text, err = capsys.readouterr()
    assert code == 0, err
    # stderr is not a terminal here: no progress bars, one plain line per epoch.
    lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"], err
    assert re.match(r"epoch 2/2: dev rsum \d+\.\d.*, mean loss \d+\.\d{3}, hardest negatives, \d+s of training",
                    lines[1]), lines[1]
    assert "\r" not in err, "no progress bar"
    assert "[4/4] drawing retrieved scenes" in text and "95% CI" in text
    report = json.loads((out / "report.json").read_text())
    assert report["ci"]["rsum"][0] <= report["rsum"] <= report["ci"]["rsum"][1]
    assert report["provenance"]["protocol"] == {"split": "test", "n_images": 100, "n_captions": 500, "fold5": False}
    rows = report["retrieval"]
    assert len(rows) == 4 and rows[-1]["rank"] > 5, "the last query shown is a failure"
    for r in rows:
        scores = [t["score"] for t in r["top"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 5
        assert (r["rank"] <= 5) == any(t["image"] == r["truth"] for t in r["top"])
        assert r["truth"] == r["caption"] // 5
        assert r["text"] == (synth_data / "test_caps.txt").read_text().splitlines()[r["caption"]]
    page = (out / "retrieval.html").read_text()
    shown = re.findall(r"src='(retrieval/\d+\.png)'", page)
    assert len(shown) == 4 * 5 + sum(r["rank"] > 5 for r in rows) and all((out / s).is_file() for s in shown)
    from PIL import Image

    picture = Image.open(out / "retrieval.png")
    assert picture.width > 800 and picture.height > 400
    assert (out / "recall.png").is_file()


def test_a_quiet_demo_prints_no_epoch_lines(synth_data: Path, tmp_path: Path, capsys) -> None:
    from itmatch.cli import main

    sets = ["model.embed_dim=16", "model.word_dim=8", "data.batch_size=64", "train.epochs=1", "data.train_images=100"]
    assert main(["-q", "demo", "--data", str(synth_data), "--out", str(tmp_path / "d"),
                 *[a for s in sets for a in ("--set", s)]]) == 0
    assert "epoch 1/1" not in capsys.readouterr().err


def test_a_second_demo_continues_the_run_and_keeps_the_users_files(synth_data: Path, tmp_path: Path,
                                                                   capsys) -> None:
    from itmatch.cli import main

    sets = ["model.embed_dim=16", "model.word_dim=8", "data.batch_size=64", "train.epochs=1", "data.train_images=100"]
    argv = ["-q", "demo", "--data", str(synth_data), "--out", str(tmp_path / "d"),
            *[a for s in sets for a in ("--set", s)]]
    assert main(argv) == 0
    best = (tmp_path / "d" / "model_best.pt").read_bytes()
    mine = tmp_path / "d" / "index_images" / "meta.json"  # what the demo told the user to build there
    mine.parent.mkdir()
    mine.write_text("the user's index\n", encoding="utf-8")
    capsys.readouterr()
    assert main(argv) == 0
    assert "continuing the run there" in capsys.readouterr().out
    assert mine.read_text(encoding="utf-8") == "the user's index\n"
    assert (tmp_path / "d" / "model_best.pt").read_bytes() == best  # the finished run is reused, not retrained
