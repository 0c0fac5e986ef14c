"""CxC recalls on miniature annotation files, against ranks counted by hand."""

import json
from pathlib import Path

import numpy as np
import pytest

from itmatch.cli import main
from itmatch.cxc import evaluate_cxc, load_cxc
from itmatch.errors import DataError


def write_cxc(root: Path, image_ids: list[str], caption_ids: list[str], it: dict, i2i: dict, t2t: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "testall_ids.txt").write_text("".join(f"{i}\n" for i in image_ids for _ in range(5)))
    (root / "testall_capids.txt").write_text("".join(f"{c}\n" for c in caption_ids))
    for name, obj in (("cxc_it.json", it), ("cxc_i2i.json", i2i), ("cxc_t2t.json", t2t)):
        (root / name).write_text(json.dumps(obj))
    return root


# Images 100, 200, 300; captions 1-5 belong to 100, 6-10 to 200, 11-15 to 300.
IMAGES = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.1, 0.2, 0.97]])
CAPTIONS = np.array([[1 - 0.01 * j, 0, 0] for j in range(5)] + [[0, 1 - 0.01 * j, 0] for j in range(5)]
                    + [[0, 0.01, 1 - 0.01 * j] for j in range(5)])
IT = {
    # i2t. Row 100 orders captions 1,2,3,4,5 first: "3" at 2. Row 200 orders 6..10 then 1..5: "1" at 5.
    # Row 300 orders 11..15 first: "12" at 1; "999" is not a test caption and is ignored.
    "i2t": {"100": [["3", 4.0], ["7", 3.0]], "200": [["1", 3.0]], "300": [["12", 5.0], ["999", 5.0]]},
    # t2i. Captions 1-5 order images 100,200,300; 6-10: 200,300,100; 11-15: 300,200,100.
    # "1" -> 300 at 2; "6" -> best of 100 (2) and 300 (1) = 1; "11" has no test image: a miss; others at 0.
    "t2i": {"1": [["300"]], **{str(c): [["100"]] for c in range(2, 6)}, "6": [["100"], ["300"]],
            **{str(c): [["200"]] for c in range(7, 11)}, "11": [["999"]], **{str(c): [["300"]] for c in range(12, 16)}},
}
# i2i (diagonal 0): row 100 = [0, .6, .1] -> positive 300 (score 3.0 >= 2.5) at 1; 200 has no positive >= 2.5:
# skipped; row 300 = [.1, .22, 0] -> positive 200 (2.5) at 0.
I2I = {"100": [["300", 3.0], ["200", 1.0]], "200": [["100", 2.0]], "300": [["200", 2.5]]}
# t2t: the 4 sibling captions are always positives and always on top here (other groups score 0 or ~0.01).
T2T = {**{str(c): [] for c in range(1, 16)}, "1": [["11", 3.5]]}


def test_hand_counted_recalls(tmp_path: Path) -> None:
    root = write_cxc(tmp_path / "cxc_annots", ["100", "200", "300"], [str(c) for c in range(1, 16)], IT, I2I, T2T)
    annots = load_cxc(tmp_path)  # finds the cxc_annots subdirectory
    got = evaluate_cxc(IMAGES, CAPTIONS, annots)
    assert got["i2t"] == pytest.approx({"R@1": 0.0, "R@5": 200 / 3, "R@10": 100.0})  # ranks 2, 5, 1
    assert got["t2i"] == pytest.approx({"R@1": 80.0, "R@5": 1400 / 15, "R@10": 1400 / 15})  # 12 at 0, 2, 1, miss
    assert got["i2i"] == pytest.approx({"R@1": 50.0, "R@5": 100.0, "R@10": 100.0})  # ranks 1, 0; one skipped
    assert got["t2t"] == pytest.approx({"R@1": 100.0, "R@5": 100.0, "R@10": 100.0})
    assert root.is_dir()


def test_bad_annotations_are_one_line(tmp_path: Path) -> None:
    write_cxc(tmp_path, ["100", "200", "300"], [str(c) for c in range(1, 16)], {"i2t": {}, "t2i": {}}, I2I, T2T)
    with pytest.raises(DataError, match="query id 100 has no entry"):
        evaluate_cxc(IMAGES, CAPTIONS, load_cxc(tmp_path))
    with pytest.raises(DataError, match="cover 3 images"):
        evaluate_cxc(IMAGES[:2], CAPTIONS[:10], load_cxc(tmp_path))
    (tmp_path / "cxc_t2t.json").unlink()
    with pytest.raises(DataError, match="missing cxc_t2t.json"):
        load_cxc(tmp_path)


def test_cli_cxc_with_only_the_coco_pairs_equals_the_standard_protocol(tiny_data: Path, tmp_path: Path,
                                                                       capsys) -> None:
    """Annotations holding just each caption's own image (and vice versa) make CxC T2I/I2T the usual recalls."""
    from itmatch.data.vocab import load_vocab
    from tests.test_checkpoints_vse_infinity import source_model, upstream_states, write_official

    vocab = load_vocab(tiny_data / "vocab.json")
    path = write_official(tmp_path / "model_best.pth",
                          upstream_states(source_model("bigru", image_dim=8, vocab_size=len(vocab) + 1), "bigru"))
    n = 10
    images, captions = [str(1000 + i) for i in range(n)], [str(5000 + c) for c in range(5 * n)]
    it = {"i2t": {im: [[captions[5 * i + k]] for k in range(5)] for i, im in enumerate(images)},
          "t2i": {c: [[images[j // 5]]] for j, c in enumerate(captions)}}
    i2i = {im: [[images[(i + 1) % n], 3.0]] for i, im in enumerate(images)}
    write_cxc(tmp_path / "cxc", images, captions, it, i2i, {c: [] for c in captions})
    code = main(["-q", "eval", str(path), "--data", str(tiny_data), "--split", "test", "--vocab",
                 str(tiny_data / "vocab.json"), "--cxc", str(tmp_path / "cxc"), "--out", str(tmp_path / "r.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "CxC i2t" in out
    results = json.loads((tmp_path / "r.json").read_text())
    for d in ("i2t", "t2i"):
        for k in ("R@1", "R@5", "R@10"):
            assert results["cxc"][d][k] == pytest.approx(results[d][k])
    assert main(["-q", "eval", str(path), str(path), "--cxc", str(tmp_path / "cxc")]) == 2
