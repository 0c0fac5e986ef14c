"""Manifests of image-caption pairs: grouping, the five-caption rule, splits, ids and the raw-image layout."""

import json
from pathlib import Path

import pytest

from itmatch.cli import main
from itmatch.data.check import check_dataset
from itmatch.data.manifest import import_manifest, parse_ratios
from itmatch.errors import DataError


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _csv(path: Path, rows: list[tuple[str, ...]], header: str = "image,caption,split") -> Path:
    path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _five(image: str, split: str, n: int = 5) -> list[tuple[str, ...]]:
    return [(image, f"{Path(image).stem} caption {k}", split) for k in range(n)]


def test_split_column_groups_rows_and_applies_the_five_caption_rule(tmp_path: Path) -> None:
    rows = _five("b.jpg", "test") + _five("a/x.jpg", "train", 7) + _five("c.jpg", "train", 2) + _five("d.jpg", "dev")
    rows.insert(3, ("e.jpg", '"a caption, with a comma"', "train"))  # e: one caption, dropped
    rows.insert(8, ("f.jpg", "interleaved", "train"))
    rows += [("f.jpg", f"f {k}", "train") for k in range(4)]  # f: 5 rows, not adjacent
    images = tmp_path / "photos"
    for name in ("b.jpg", "a/x.jpg", "d.jpg", "f.jpg"):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(b"")
    out = tmp_path / "data"
    report = import_manifest(_csv(tmp_path / "pairs.csv", rows), out, split_column="split", images=images)
    assert (report.rows, report.dropped, report.trimmed) == (len(rows), 2, 1)
    assert report.images == {"train": 2, "dev": 1, "test": 1}
    root = out / "precomp"
    # ids in order of first appearance over the kept images: b 0, a/x 1, f 2, d 3
    assert _lines(root / "train_ids.txt") == ["1", "2"]
    assert _lines(root / "test_ids.txt") == ["0"] and _lines(root / "dev_ids.txt") == ["3"]
    assert _lines(root / "train_caps.txt") == [f"x caption {k}" for k in range(5)] + [
        "interleaved", "f 0", "f 1", "f 2", "f 3"]
    assert json.loads((out / "id_mapping.json").read_text()) == {"0": "b.jpg", "1": "a/x.jpg", "2": "f.jpg",
                                                                 "3": "d.jpg"}
    assert check_dataset(out, str(images))[1] == []


def test_ratio_split_is_a_seeded_permutation_with_rounded_counts(tmp_path: Path) -> None:
    rows = [r for i in range(7) for r in _five(f"{i}.jpg", "")]
    manifest = _csv(tmp_path / "pairs.csv", rows)
    a = import_manifest(manifest, tmp_path / "a", ratios=(0.5, 0.25, 0.25), seed=3)
    assert a.images == {"train": 3, "dev": 2, "test": 2}  # 7 x 0.25 = 1.75 -> 2 each, the rest train
    splits = {s: [int(i) for i in _lines(tmp_path / "a" / "precomp" / f"{s}_ids.txt")] for s in a.images}
    assert sorted(sum(splits.values(), [])) == list(range(7))
    assert all(ids == sorted(ids) for ids in splits.values())  # manifest order inside a split
    for s, ids in splits.items():
        assert _lines(tmp_path / "a" / "precomp" / f"{s}_caps.txt")[::5] == [f"{i} caption 0" for i in ids]
    import_manifest(manifest, tmp_path / "b", ratios=(0.5, 0.25, 0.25), seed=3)
    import_manifest(manifest, tmp_path / "c", ratios=(0.5, 0.25, 0.25), seed=4)
    same = [_lines(tmp_path / d / "precomp" / "train_ids.txt") for d in ("a", "b", "c")]
    assert same[0] == same[1] != same[2]
    zero = import_manifest(manifest, tmp_path / "d", ratios=(1.0, 0.0, 0.0))
    assert zero.images == {"train": 7} and not (tmp_path / "d" / "precomp" / "dev_caps.txt").exists()


def test_jsonl_with_integer_ids_keeps_them_and_writes_no_mapping(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps({"image": str(900 + i), "caption": f"photo {i} text {k}", "split": s})
             for i, s in ((1, "train"), (2, "test")) for k in range(5)]
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    report = import_manifest(path, tmp_path / "out", split_column="split")
    assert not report.id_mapping and not (tmp_path / "out" / "id_mapping.json").exists()
    assert _lines(tmp_path / "out" / "precomp" / "train_ids.txt") == ["901"]
    assert _lines(tmp_path / "out" / "precomp" / "test_caps.txt")[4] == "photo 2 text 4"


@pytest.mark.parametrize("text,rows,extra,match", [
    ("image,text\n", [], [], "no 'caption' column in the header (image, text)"),
    ("image,caption,split\n", _five("a.jpg", "val"), ["--split-column", "split"],
     "pairs.csv:2: split 'val' is not one of train, dev, test, testall"),
    ("image,caption,split\n", _five("a.jpg", "train", 3) + _five("a.jpg", "test", 2), ["--split-column", "split"],
     "pairs.csv:5: image a.jpg is in split 'test' here and 'train' at"),
    ("image,caption,split\n", _five("a.jpg", "train", 4), [], "no image has 5 captions (1 image(s) with fewer"),
    ("image,caption,split\n", [("a.jpg", " ", "train")], [], "pairs.csv:2: empty caption"),
    ("image,caption,split\n", _five("a.jpg", "train"), ["--split-ratio", "0.8,0.1"], "expected three non-negative"),
    ("image,caption,split\n", _five("a.jpg", "train"), ["--split-ratio", "0.8,0.1,0.1", "--split-column", "split"],
     "either --split-ratio or --split-column"),
    ("image,caption,split\n", _five("a.jpg", "train"), ["--images", "nowhere"], "image folder not found: nowhere"),
])
def test_bad_manifests_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture, text: str,
                                           rows: list, extra: list[str], match: str) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text(text + "".join(",".join(r) + "\n" for r in rows), encoding="utf-8")
    argv = ["-q", "data", "import-manifest", "--manifest", str(path), "--out", str(tmp_path / "out"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("itmatch: error: ") and match in err[0], err
    assert not (tmp_path / "out").exists()


def test_parse_ratios() -> None:
    assert parse_ratios("0.8,0.1,0.1") == (0.8, 0.1, 0.1)
    for bad in ("a,b,c", "0.5,0.6,-0.1", "0.5,0.5,0.5"):
        with pytest.raises(DataError, match="--split-ratio"):
            parse_ratios(bad)


def test_existing_output_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    manifest = _csv(tmp_path / "pairs.csv", _five("a.jpg", ""))
    argv = ["-q", "data", "import-manifest", "--manifest", str(manifest), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "wrote 1 images from 5 rows" in printed and "0 image(s) with fewer than 5 dropped" in printed
    assert main(argv) == 2 and "pass --force to overwrite" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
