"""The README's "Your own data" examples, run as written (parsed from the README, so text and test cannot drift)."""

import csv
import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from itmatch.cli import main
from itmatch.data.precomp import load_split

README = Path(__file__).resolve().parents[1] / "README.md"
DIM = 8


def readme_commands(title: str) -> list[list[str]]:
    """The `itmatch` command lines of the fenced block under `### title` in the "Your own data" section."""
    section = README.read_text(encoding="utf-8").split("\n## Your own data\n", 1)[1].split("\n## ", 1)[0]
    block = section.split(f"\n### {title}\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    assert commands and all(c[0] == "itmatch" for c in commands), commands
    return [c[1:] for c in commands]


def run(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    code = main(["-q", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def _npz(folder: Path, key: str, boxes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"{key}.npz", x=rng.random((boxes, DIM), dtype=np.float32),
             bbox=rng.random((boxes, 4), dtype=np.float32) * 100, num_bbox=boxes, image_w=500, image_h=375)


def _karpathy_files(root: Path) -> None:
    splits = ["train"] * 4 + ["val"] * 2 + ["test"] * 2
    images = []
    for imgid, split in enumerate(splits):
        raws = [f"A person number {imgid} does thing {k}." for k in range(5 + (imgid == 1))]
        images.append({"imgid": imgid, "filename": f"{1000 + imgid}.jpg", "split": split,
                       "sentences": [{"raw": r, "tokens": r.lower().split()} for r in raws]})
    (root / "dataset_flickr30k.json").write_text(json.dumps({"dataset": "flickr30k", "images": images}))
    folder = root / "data" / "f30k" / "flickr30k-images"
    folder.mkdir(parents=True)
    for imgid in range(len(splits)):
        (folder / f"{1000 + imgid}.jpg").write_bytes(b"")
        _npz(root / "features" / "f30k", str(1000 + imgid), 10 + 15 * imgid, imgid)  # 10 .. 115 boxes


def test_karpathy_then_regions_examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    _karpathy_files(tmp_path)
    first, check = readme_commands("Karpathy split files")
    printed = run(capsys, first)
    assert "train 4 images, dev 2 images, test 2 images" in printed and "1 image(s) had more than 5" in printed
    assert "OK" in run(capsys, check)
    regions, check = readme_commands("Region features from a PyTorch bottom-up-attention extractor")
    printed = run(capsys, regions)
    assert "wrote 4 images x 36 regions x 8" in printed
    assert "2 image(s) had more than 36 boxes (kept the first 36), 2 fewer" in printed
    assert "OK" in run(capsys, check)
    split, _ = load_split("data/f30k", "train")
    assert split.images.shape == (4, 36, DIM) and split.n_captions == 20
    first_image = np.load("features/f30k/1000.npz")["x"]  # 10 boxes, then zero padding
    np.testing.assert_array_equal(split.images[0][:10], first_image)
    assert not split.images[0][10:].any()


def test_manifest_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    with open("pairs.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        for i in range(11):  # 10 images with 5 captions (one with 6), and one with 3 (dropped)
            (tmp_path / "photos" / f"p{i}.jpg").write_bytes(b"")
            for k in range(6 if i == 0 else 3 if i == 10 else 5):
                writer.writerow([f"p{i}.jpg", f"my photo {i}, view {k}"])
            _npz(tmp_path / "features" / "mine", f"p{i}", 36, i)
    manifest, regions, check = readme_commands("A manifest of your own pairs")
    printed = run(capsys, manifest)
    assert "wrote 10 images from 54 rows" in printed and "train 8, dev 1, test 1" in printed
    assert "1 image(s) with more than 5 captions kept their first 5; 1 image(s) with fewer than 5 dropped" in printed
    run(capsys, regions)
    assert "OK" in run(capsys, check)
    split, _ = load_split("data/mine", "train")
    mapping = json.loads(Path("data/mine/id_mapping.json").read_text())
    for row, image_id in enumerate(split.ids or []):
        stem = Path(mapping[str(image_id)]).stem
        np.testing.assert_array_equal(split.images[row], np.load(f"features/mine/{stem}.npz")["x"])
