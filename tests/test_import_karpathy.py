"""Karpathy split files: splits, caption order, ids, id_mapping.json and vocabulary as the originals' files."""

import json
from pathlib import Path

import pytest

from itmatch.cli import main
from itmatch.data import karpathy
from itmatch.data.check import check_dataset
from itmatch.data.karpathy import import_karpathy
from itmatch.data.vocab import SPECIALS, load_vocab
from itmatch.errors import DataError


def _image(imgid: int, filename: str, split: str, raws: list[str], **extra) -> dict:
    sentences = [{"raw": r, "tokens": r.lower().rstrip(".").split(), "imgid": imgid, "sentid": 10 * imgid + k}
                 for k, r in enumerate(raws)]
    return {"imgid": imgid, "filename": filename, "split": split, "sentences": sentences, **extra}


def _five(word: str) -> list[str]:
    return [f"A {word}."] * 5


# Train + dev captions: "man" 18 times, "dog" 4 (kept: threshold 4), "cat" 3 (dropped); "bird" only in test and
# "zebra" only in the sixth caption of image 1 (never written, so never counted).
F30K = {
    "dataset": "flickr30k",
    "images": [
        _image(0, "1000.jpg", "train", ["A man.", "A man.", "A man.", "A dog.", "A dog."]),
        _image(1, "1001.jpg", "test", _five("bird")),  # test listed between train images: file order per split
        _image(2, "1002.jpg", "train",
               ["A man.", "A man.", "A cat.", "A cat.", "A man.", "zebra zebra zebra zebra"]),
        _image(3, "1003.jpg", "val", ["A man.", "A dog.", "A dog.", "A cat.", "A man."]),
        _image(4, "1004.jpg", "val", _five("man")),
        _image(5, "1005.jpg", "test", ["Two  birds\non a\twire. ", "A bird.", "A bird.", "A bird.", "A bird."]),
        _image(6, "1006.jpg", "train", ["A man.", "A man.", "A man.", "A man.", "A man."]),
    ],
}


def _coco_image(cocoid: int, split: str, folder: str = "val2014", n: int = 5) -> dict:
    name = f"COCO_{folder}_{cocoid:012d}.jpg"
    raws = [f"Caption {k} of {cocoid}." for k in range(n)]
    return _image(cocoid % 100, name, split, raws, cocoid=cocoid, filepath=folder)


COCO = {
    "dataset": "coco",
    "images": [
        _coco_image(391895, "test"), _coco_image(522418, "restval"), _coco_image(184613, "train", "train2014"),
        _coco_image(318219, "test"), _coco_image(554625, "val", n=7), _coco_image(397133, "test"),
        _coco_image(9, "train", "train2014"),
    ],
}


def _write(tmp_path: Path, name: str, payload: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(payload), encoding="utf-8")
    return path


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_flickr_splits_raw_captions_ids_and_vocab(tmp_path: Path) -> None:
    out = tmp_path / "f30k"
    report = import_karpathy(_write(tmp_path, "dataset_flickr30k.json", F30K), out)
    root = out / "precomp"
    assert report.images == {"train": 3, "dev": 2, "test": 2} and report.trimmed == 1
    assert _lines(root / "train_ids.txt") == ["0", "2", "6"]
    assert _lines(root / "dev_ids.txt") == ["3", "4"]
    assert _lines(root / "test_ids.txt") == ["1", "5"]
    assert _lines(root / "train_caps.txt") == [
        "A man.", "A man.", "A man.", "A dog.", "A dog.",
        "A man.", "A man.", "A cat.", "A cat.", "A man.",  # the sixth (zebra) caption is cut
        "A man.", "A man.", "A man.", "A man.", "A man.",
    ]
    assert _lines(root / "test_caps.txt") == ["A bird."] * 5 + ["Two birds on a wire.", "A bird.", "A bird.",
                                                                 "A bird.", "A bird."]
    vocab = load_vocab(root / "vocab.json")
    words = [vocab.idx2word[i] for i in range(len(vocab))]
    assert words == [*SPECIALS, "a", "man", ".", "dog"]
    assert not (out / "id_mapping.json").exists()


def test_coco_train_is_train_then_restval_and_test_is_the_first_fold(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(karpathy, "COCO_TEST_IMAGES", 2)  # 1,000 in the real file; 2 of 3 here
    images = tmp_path / "images"
    for item in COCO["images"]:
        (images / item["filepath"]).mkdir(parents=True, exist_ok=True)
        (images / item["filepath"] / item["filename"]).write_bytes(b"")
    out = tmp_path / "coco"
    report = import_karpathy(_write(tmp_path, "dataset_coco.json", COCO), out, images=images)
    root = out / "precomp"
    assert report.images == {"train": 3, "dev": 1, "test": 2, "testall": 3}
    assert _lines(root / "train_ids.txt") == ["184613", "9", "522418"]
    assert _lines(root / "dev_ids.txt") == ["554625"]
    assert _lines(root / "testall_ids.txt") == ["391895", "318219", "397133"]
    assert _lines(root / "test_ids.txt") == ["391895", "318219"]
    assert _lines(root / "dev_caps.txt") == [f"Caption {k} of 554625." for k in range(5)]  # 7 -> first 5
    assert report.trimmed == 1
    mapping = json.loads((out / "id_mapping.json").read_text(encoding="utf-8"))
    assert mapping["9"] == "train2014/COCO_train2014_000000000009.jpg"
    assert mapping["391895"] == "val2014/COCO_val2014_000000391895.jpg"
    assert len(mapping) == 7
    lines, problems = check_dataset(out, str(images))
    assert problems == [] and len(lines) == 4


def test_id_field_stem_and_image_folder_check(tmp_path: Path) -> None:
    path = _write(tmp_path, "dataset_flickr30k.json", F30K)
    import_karpathy(path, tmp_path / "a", id_field="stem")
    assert _lines(tmp_path / "a" / "precomp" / "train_ids.txt") == ["1000", "1002", "1006"]
    images = tmp_path / "a" / "flickr30k-images"
    images.mkdir()
    for k in range(6):  # 1006.jpg missing
        (images / f"100{k}.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"1006\.jpg: image not found \(1 of 7 missing\)"):
        import_karpathy(path, tmp_path / "b", images=images)
    (images / "1006.jpg").write_bytes(b"")
    import_karpathy(path, tmp_path / "a", images=images, force=True)
    assert json.loads((tmp_path / "a" / "id_mapping.json").read_text())["6"] == "1006.jpg"
    assert check_dataset(tmp_path / "a")[1] == []  # finds DIR/flickr30k-images itself
    (images / "1003.jpg").unlink()
    problems = check_dataset(tmp_path / "a")[1]
    assert len(problems) == 1 and "1003.jpg: image not found" in problems[0]


def _error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("itmatch: error: "), err
    return err[0]


def test_bad_inputs_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    few = json.loads(json.dumps(F30K))
    few["images"][3]["sentences"] = few["images"][3]["sentences"][:4]
    bad_split = json.loads(json.dumps(F30K))
    bad_split["images"][0]["split"] = "validation"
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    out = str(tmp_path / "out")
    assert "image 1003.jpg: 4 sentence(s); every image needs 5" in _error(
        capsys, ["data", "import-karpathy", "--json", str(_write(tmp_path, "few.json", few)), "--out", out])
    assert "image 1000.jpg: split 'validation'" in _error(
        capsys, ["data", "import-karpathy", "--json", str(_write(tmp_path, "s.json", bad_split)), "--out", out])
    assert "not valid JSON" in _error(capsys, ["data", "import-karpathy", "--json", str(tmp_path / "bad.json"),
                                               "--out", out])
    assert not (tmp_path / "out").exists()  # a rejected file writes nothing


def test_existing_output_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = str(_write(tmp_path, "dataset_flickr30k.json", F30K))
    out = tmp_path / "out"
    argv = ["data", "import-karpathy", "--json", path, "--out", str(out)]
    assert main(["-q", *argv]) == 0
    printed = capsys.readouterr().out
    assert "train 3 images, dev 2 images, test 2 images" in printed
    assert "1 image(s) had more than 5 captions: kept their first 5" in printed
    (out / "precomp" / "train_caps.txt").write_text("mine\n", encoding="utf-8")
    assert "pass --force to overwrite" in _error(capsys, argv)
    assert _lines(out / "precomp" / "train_caps.txt") == ["mine"]
    assert main(["-q", *argv, "--force"]) == 0
    assert len(_lines(out / "precomp" / "train_caps.txt")) == 15
