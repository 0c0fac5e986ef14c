"""BUTD TSV conversion: rows follow the id list, outputs are valid .npy files, errors leave no output."""

import base64
from pathlib import Path

import numpy as np
import pytest

from itmatch.data.butd import convert_butd
from itmatch.errors import DataError

K, D = 3, 5


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.float32).tobytes()).decode("ascii")


def _image(image_id: int) -> dict:
    """Deterministic, distinct arrays for one image."""
    rng = np.random.default_rng(image_id)
    return {
        "id": image_id,
        "w": 100 + image_id,
        "h": 50 + image_id,
        "boxes": rng.random((K, 4), dtype=np.float32) * 100,
        "features": rng.standard_normal((K, D), dtype=np.float32),
    }


def _line(img: dict, num_boxes: int | None = None) -> str:
    n = K if num_boxes is None else num_boxes
    return "\t".join(
        [str(img["id"]), str(img["w"]), str(img["h"]), str(n), _b64(img["boxes"]), _b64(img["features"])]
    )


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture
def images() -> dict[int, dict]:
    return {i: _image(i) for i in (11, 22, 33, 44, 99)}


def test_convert_writes_list_order_and_skips_unlisted(tmp_path: Path, images: dict[int, dict]) -> None:
    # TSV order 33, 99 (not listed), 11 in shard a; 44, 22 in shard b. List order: 22, 11, 44, 33.
    shard_a = _write(tmp_path / "a.tsv", [_line(images[33]), _line(images[99]), _line(images[11])])
    shard_b = _write(tmp_path / "b.tsv", [_line(images[44]), _line(images[22])])
    ids = _write(tmp_path / "test_ids_in.txt", ["22", "11", "", "44", "33"])
    out = tmp_path / "out"
    n = convert_butd([shard_a, shard_b], ids, out, "test")
    assert n == 4
    order = [22, 11, 44, 33]
    ims = np.load(out / "test_ims.npy", mmap_mode="r")
    assert isinstance(ims, np.memmap)
    assert ims.dtype == np.float32 and ims.shape == (4, K, D)
    np.testing.assert_array_equal(ims, np.stack([images[i]["features"] for i in order]))
    boxes = np.load(out / "test_boxes.npy")
    assert boxes.dtype == np.float32 and boxes.shape == (4, K, 4)
    np.testing.assert_array_equal(boxes, np.stack([images[i]["boxes"] for i in order]))
    sizes = np.load(out / "test_sizes.npy")
    assert np.issubdtype(sizes.dtype, np.integer)
    np.testing.assert_array_equal(sizes, [[images[i]["w"], images[i]["h"]] for i in order])
    assert (out / "test_ids.txt").read_text(encoding="utf-8").split() == [str(i) for i in order]
    assert sorted(p.name for p in out.iterdir()) == [
        "test_boxes.npy", "test_ids.txt", "test_ims.npy", "test_sizes.npy"
    ]


def test_single_tsv_path(tmp_path: Path, images: dict[int, dict]) -> None:
    tsv = _write(tmp_path / "one.tsv", [_line(images[11])])
    ids = _write(tmp_path / "ids.txt", ["11"])
    assert convert_butd(tsv, ids, tmp_path / "out", "dev", progress=True) == 1
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "dev_ims.npy")[0], images[11]["features"])


def test_missing_id_is_reported_and_no_output_left(tmp_path: Path, images: dict[int, dict]) -> None:
    tsv = _write(tmp_path / "f.tsv", [_line(images[11]), _line(images[22])])
    ids = _write(tmp_path / "ids.txt", ["11", "12345", "22"])
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"1 of 3 image id\(s\).*12345") as info:
        convert_butd(tsv, ids, out, "train")
    assert "\n" not in str(info.value)
    assert list(out.iterdir()) == []


def test_inconsistent_box_count(tmp_path: Path, images: dict[int, dict]) -> None:
    odd = dict(images[22], boxes=np.zeros((2, 4), np.float32), features=np.zeros((2, D), np.float32))
    tsv = _write(tmp_path / "f.tsv", [_line(images[11]), _line(odd, num_boxes=2)])
    ids = _write(tmp_path / "ids.txt", ["11", "22"])
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"f\.tsv:2: image 22 has 2 boxes but earlier images have 3"):
        convert_butd(tsv, ids, out, "train")
    assert list(out.iterdir()) == []


def test_size_mismatch_and_bad_base64(tmp_path: Path, images: dict[int, dict]) -> None:
    ids = _write(tmp_path / "ids.txt", ["11", "22"])
    short = dict(images[22], features=np.zeros((K, D - 1), np.float32))
    tsv = _write(tmp_path / "short.tsv", [_line(images[11]), _line(short)])
    with pytest.raises(DataError, match="image 22: expected 3x4 box and 3x5 feature values"):
        convert_butd(tsv, ids, tmp_path / "out", "train")
    bad = _line(images[22]).rsplit("\t", 1)[0] + "\tnot*base64!"
    tsv = _write(tmp_path / "bad.tsv", [_line(images[11]), bad])
    with pytest.raises(DataError, match=r"bad\.tsv:2: image 22: field 'features' is not base64"):
        convert_butd(tsv, ids, tmp_path / "out", "train")
    truncated = _line(images[22]).rsplit("\t", 1)[0]
    tsv = _write(tmp_path / "trunc.tsv", [truncated])
    with pytest.raises(DataError, match=r"trunc\.tsv:1: expected 6 tab-separated fields"):
        convert_butd(tsv, ids, tmp_path / "out", "train")


@pytest.mark.parametrize(
    ("lines", "fragment"),
    [([], "is empty"), (["", "  "], "is empty"), (["1", "2", "1"], r"repeats 1 id\(s\), e\.g\. \[1\]"),
     (["1", "x"], r"ids\.txt:2: 'x' is not an integer")],
)
def test_bad_id_lists(tmp_path: Path, images: dict[int, dict], lines: list[str], fragment: str) -> None:
    tsv = _write(tmp_path / "f.tsv", [_line(images[11])])
    ids = _write(tmp_path / "ids.txt", lines)
    with pytest.raises(DataError, match=fragment):
        convert_butd(tsv, ids, tmp_path / "out", "train")


def test_missing_files(tmp_path: Path) -> None:
    ids = _write(tmp_path / "ids.txt", ["1"])
    with pytest.raises(DataError, match="BUTD feature file not found"):
        convert_butd(tmp_path / "none.tsv", ids, tmp_path / "out", "train")
    with pytest.raises(DataError, match="image id list not found"):
        convert_butd(tmp_path / "none.tsv", tmp_path / "none.txt", tmp_path / "out", "train")


def test_failure_keeps_previous_outputs(tmp_path: Path, images: dict[int, dict]) -> None:
    out = tmp_path / "out"
    ids = _write(tmp_path / "ids.txt", ["11"])
    convert_butd(_write(tmp_path / "good.tsv", [_line(images[11])]), ids, out, "test")
    before = (out / "test_ims.npy").read_bytes()
    with pytest.raises(DataError):
        convert_butd(_write(tmp_path / "empty.tsv", []), ids, out, "test")
    assert (out / "test_ims.npy").read_bytes() == before
    assert len(list(out.iterdir())) == 4
