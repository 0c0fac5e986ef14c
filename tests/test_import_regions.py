"""Per-image region features: id-list order, fixed and cut/padded box counts, GSMN files, errors, resuming."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from itmatch.cli import main
from itmatch.data.check import check_dataset
from itmatch.data.gsmn_files import load_image_sizes
from itmatch.data.regions import import_regions
from itmatch.errors import DataError

D = 3


def _features(image_id: int, boxes: int) -> np.ndarray:
    """Row r of image i is [i, r, r + 0.5]: every value says where it came from."""
    return np.array([[image_id, r, r + 0.5] for r in range(boxes)], dtype=np.float32)


def _boxes(image_id: int, boxes: int) -> np.ndarray:
    return np.array([[r, image_id, r + 10, image_id + 20] for r in range(boxes)], dtype=np.float32)


def _npz(folder: Path, key: str, image_id: int, boxes: int, w: int = 640, h: int = 480) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"{key}.npz", x=_features(image_id, boxes), bbox=_boxes(image_id, boxes), num_bbox=boxes,
             image_w=w, image_h=h)


def _ids(path: Path, ids: list[int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    return path


def test_fixed_boxes_follow_the_id_list(tmp_path: Path) -> None:
    feats = tmp_path / "feats"
    for image_id in (7, 3, 5):
        _npz(feats, str(image_id), image_id, 2, w=100 + image_id, h=50 + image_id)
    out = tmp_path / "out"
    report = import_regions(feats, _ids(tmp_path / "train_ids.txt", [5, 7, 3]), out, "train")
    assert (report.images, report.regions, report.dim, report.cut, report.padded) == (3, 2, D, 0, 0)
    ims = np.load(out / "train_ims.npy", mmap_mode="r")
    assert ims.dtype == np.float32 and ims.shape == (3, 2, D)
    np.testing.assert_array_equal(ims[:, :, 0], [[5, 5], [7, 7], [3, 3]])
    np.testing.assert_array_equal(ims[1], [[7, 0, 0.5], [7, 1, 1.5]])
    np.testing.assert_array_equal(np.load(out / "train_ims_bbx.npy")[2], [[0, 3, 10, 23], [1, 3, 11, 23]])
    np.testing.assert_array_equal(load_image_sizes(out / "train_ims_size.npy"), [[105, 55], [107, 57], [103, 53]])
    assert (out / "train_ids.txt").read_text().split() == ["5", "7", "3"]
    assert sorted(p.name for p in out.iterdir()) == ["train_ids.txt", "train_ims.npy", "train_ims_bbx.npy",
                                                     "train_ims_size.npy"]


def test_adaptive_boxes_keep_the_first_k_and_pad_with_zeros(tmp_path: Path) -> None:
    feats = tmp_path / "feats"
    for image_id, boxes in ((1, 2), (2, 4), (3, 3)):
        _npz(feats, str(image_id), image_id, boxes)
    ids = _ids(tmp_path / "test_ids.txt", [1, 2, 3])
    with pytest.raises(DataError, match=r"image 2 .* has 4 boxes but earlier images have 2; pass --regions K"):
        import_regions(feats, ids, tmp_path / "a", "test")
    report = import_regions(feats, ids, tmp_path / "b", "test", regions=3)
    assert (report.regions, report.cut, report.padded) == (3, 1, 1)
    ims = np.load(tmp_path / "b" / "test_ims.npy")
    np.testing.assert_array_equal(ims[0], [[1, 0, 0.5], [1, 1, 1.5], [0, 0, 0]])  # padded
    np.testing.assert_array_equal(ims[1], [[2, 0, 0.5], [2, 1, 1.5], [2, 2, 2.5]])  # 4th box cut
    np.testing.assert_array_equal(ims[2], _features(3, 3))
    bbx = np.load(tmp_path / "b" / "test_ims_bbx.npy")
    np.testing.assert_array_equal(bbx[0, 2], [0, 0, 0, 0])
    np.testing.assert_array_equal(bbx[1], _boxes(2, 3))


def test_files_named_by_the_mapped_image_stem_and_npy_pairs(tmp_path: Path) -> None:
    root = tmp_path / "f30k"
    (root).mkdir()
    (root / "id_mapping.json").write_text(json.dumps({"0": "1000092795.jpg", "1": "10002456.jpg"}))
    ids = _ids(root / "precomp" / "dev_ids.txt", [1, 0])
    feats = tmp_path / "feats"
    _npz(feats, "1000092795", 0, 2)
    np.save(feats / "10002456.npy", _features(1, 2))
    np.save(feats / "10002456_boxes.npy", _boxes(1, 2))
    with pytest.raises(DataError, match=r"image 0: 1000092795.npz but earlier images have .npy files; one format"):
        import_regions(feats, ids, root / "precomp", "dev")
    np.save(feats / "1000092795.npy", _features(0, 2))
    (feats / "1000092795.npz").unlink()
    np.save(feats / "1000092795_boxes.npy", _boxes(0, 2))
    report = import_regions(feats, ids, root / "precomp", "dev")
    assert not report.sizes and not (root / "precomp" / "dev_ims_size.npy").exists()
    np.testing.assert_array_equal(np.load(root / "precomp" / "dev_ims.npy")[:, 0, 0], [1, 0])
    np.testing.assert_array_equal(np.load(root / "precomp" / "dev_ims_bbx.npy")[1], _boxes(0, 2))


@pytest.mark.parametrize("problem,match", [
    ("missing", r"image 9: no feature file in .* \(looked for 9.npz, 9.npy\)"),
    ("duplicate", r"image 9: several feature files \(9.npz, 9.npy\)"),
    ("bbox shape", r"image 9 \(.*9.npz\): boxes must be \(2, 4\) numbers"),
    ("num_bbox", r"image 9 \(.*9.npz\): num_bbox is 5 but 'x' has 2 rows"),
    ("no size", r"image 9 \(.*9.npz\): no 'image_w' array"),
    ("nan", r"image 9 \(.*9.npz\): non-finite value"),
    ("dim", r"image 9 \(.*9.npz\): feature size 4, earlier images have 3"),
    ("repeated id", r"repeats 1 id\(s\), e.g. \[4\]"),
])
def test_bad_items_are_one_line_errors_naming_the_image(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        problem: str, match: str) -> None:
    feats = tmp_path / "feats"
    _npz(feats, "4", 4, 2)
    ids = [4, 9]
    x, bbox, extra = _features(9, 2), _boxes(9, 2), {"num_bbox": 2, "image_w": 10, "image_h": 10}
    match problem:
        case "duplicate":
            np.save(feats / "9.npy", x)
        case "bbox shape":
            bbox = bbox[:, :3]
        case "num_bbox":
            extra["num_bbox"] = 5
        case "no size":
            del extra["image_w"]
        case "nan":
            x[1, 1] = np.nan
        case "dim":
            x = np.zeros((2, 4), dtype=np.float32)
        case "repeated id":
            ids = [4, 9, 4]
    if problem != "missing":
        np.savez(feats / "9.npz", x=x, bbox=bbox, **extra)
    argv = ["data", "import-regions", "--features", str(feats), "--ids", str(_ids(tmp_path / "ids.txt", ids)),
            "--out", str(tmp_path / "out"), "--split", "train"]
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("itmatch: error: ")
    assert re.search(match, err[0]), err[0]
    assert not (tmp_path / "out" / "train_ims.npy").exists()


class Stop(Exception):
    pass


def test_interrupted_import_resumes_where_it_stopped(tmp_path: Path) -> None:
    feats = tmp_path / "feats"
    ids = list(range(10, 17))
    for image_id in ids:
        _npz(feats, str(image_id), image_id, 1 + image_id % 3)
    ids_path = _ids(tmp_path / "train_ids.txt", ids)
    out = tmp_path / "out"

    def stop_at_5(row: int) -> None:
        if row == 5:
            raise Stop

    with pytest.raises(Stop):
        import_regions(feats, ids_path, out, "train", regions=2, chunk=2, on_image=stop_at_5)
    assert not (out / "train_ims.npy").exists()
    state = json.loads((out / ".train_regions.progress.json").read_text())
    assert state["done"] == 4  # chunks of 2: rows 0-3 are safely on disk, row 4 is redone
    seen: list[int] = []
    report = import_regions(feats, ids_path, out, "train", regions=2, chunk=2, on_image=seen.append)
    assert seen == [4, 5, 6] and report.resumed_at == 4
    assert (report.cut, report.padded) == (2, 2)  # 3 boxes: ids 11, 14; 1 box: ids 12, 15
    fresh = import_regions(feats, ids_path, tmp_path / "fresh", "train", regions=2)
    assert fresh.resumed_at == 0 and (fresh.cut, fresh.padded) == (2, 2)
    for name in ("train_ims.npy", "train_ims_bbx.npy", "train_ims_size.npy"):
        np.testing.assert_array_equal(np.load(out / name), np.load(tmp_path / "fresh" / name))
    assert sorted(p.name for p in out.iterdir()) == ["train_ids.txt", "train_ims.npy", "train_ims_bbx.npy",
                                                     "train_ims_size.npy"]


def test_changed_inputs_restart_instead_of_resuming(tmp_path: Path) -> None:
    feats = tmp_path / "feats"
    for image_id in (1, 2, 3):
        _npz(feats, str(image_id), image_id, 2)
    ids_path = _ids(tmp_path / "train_ids.txt", [1, 2, 3])

    def stop_at_2(row: int) -> None:
        if row == 2:
            raise Stop

    with pytest.raises(Stop):
        import_regions(feats, ids_path, tmp_path / "out", "train", chunk=1, on_image=stop_at_2)
    report = import_regions(feats, ids_path, tmp_path / "out", "train", regions=4)  # other K: start over
    assert report.resumed_at == 0
    assert np.load(tmp_path / "out" / "train_ims.npy").shape == (3, 4, D)


def test_outputs_need_force_and_the_result_passes_data_check(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    feats = tmp_path / "feats"
    for image_id in (1, 2):
        _npz(feats, str(image_id), image_id, 2)
    out = tmp_path / "out"
    _ids(out / "test_ids.txt", [2, 1])
    (out / "test_caps.txt").write_text("".join(f"caption {k}\n" for k in range(10)), encoding="utf-8")
    argv = ["-q", "data", "import-regions", "--features", str(feats), "--ids", str(out / "test_ids.txt"),
            "--out", str(out), "--split", "test"]
    assert main(argv) == 0
    assert "wrote 2 images x 2 regions x 3" in capsys.readouterr().out
    assert check_dataset(out)[1] == []
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "test_ims.npy exists" in err and "pass --force to overwrite" in err
    assert main([*argv, "--force"]) == 0
    np.save(out / "test_ims_bbx.npy", np.zeros((2, 3, 4), dtype=np.float32))
    problems = check_dataset(out)[1]
    assert len(problems) == 1 and "test_ims_bbx.npy" in problems[0]
