"""Tests for the embedded synthetic dataset (itmatch.data.synthetic): layout, determinism, contrast pairs."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itmatch.data.synthetic import generate, writer
from itmatch.errors import DataError

SIZES = {"train": 60, "dev": 20, "test": 40}
DIM = 32


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _scenes(root: Path, split: str) -> list[dict]:
    lines = (root / "scenes.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def _pairs(records: list[dict]) -> list[tuple[dict, dict]]:
    groups: dict[int, list[dict]] = {}
    for r in records:
        if r["group"] is not None:
            groups.setdefault(r["group"], []).append(r)
    return [(g[0], g[1]) for g in groups.values()]


def _centre(box: list[float]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


@pytest.fixture(scope="module")
def f30k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("f30k")
    assert generate(root, seed=3, dim=DIM, sizes=SIZES) == SIZES
    return root


def test_same_seed_gives_identical_bytes_and_other_seed_differs(f30k: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate(again, seed=3, dim=DIM, sizes=SIZES)
    first, second = _files(f30k), _files(again)
    assert sorted(first) == sorted(
        [f"{s}_{k}" for s in SIZES for k in ("ims.npy", "boxes.npy", "caps.txt", "ids.txt")] + ["scenes.jsonl"]
        + [f"{s}_{k}" for s in SIZES for k in ("ims_bbx.npy", "ims_size.npy", "caps.json", "precaps_stan.txt")]
    )
    assert first == second
    other = tmp_path / "other"
    generate(other, seed=4, dim=DIM, sizes=SIZES)
    for split in SIZES:
        assert not np.array_equal(np.load(f30k / f"{split}_ims.npy"), np.load(other / f"{split}_ims.npy"))


def test_layout_shapes_and_values(f30k: Path) -> None:
    all_ids: list[int] = []
    for split, n in SIZES.items():
        ims = np.load(f30k / f"{split}_ims.npy")
        assert ims.shape == (n, 36, DIM) and ims.dtype == np.float32
        assert np.isfinite(ims).all() and (ims >= 0).all() and (ims > 0).mean() > 0.2
        boxes = np.load(f30k / f"{split}_boxes.npy")
        assert boxes.shape == (n, 36, 4) and boxes.dtype == np.float32
        assert (boxes[..., 0] >= 0).all() and (boxes[..., 1] >= 0).all()
        assert (boxes[..., 2] <= 480).all() and (boxes[..., 3] <= 320).all()
        assert (boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all()
        raw = (f30k / f"{split}_caps.txt").read_bytes().decode("utf-8")
        assert raw.endswith("\n")
        caps = raw[:-1].split("\n")
        assert len(caps) == 5 * n
        for cap in caps:
            assert re.fullmatch(r"[A-Za-z][a-z]*( [a-z]+,?)* [a-z]+\.", cap), cap
        for i in range(n):  # five different captions per image
            assert len(set(caps[5 * i : 5 * i + 5])) == 5
        ids = [int(x) for x in (f30k / f"{split}_ids.txt").read_text().split()]
        assert len(ids) == n
        all_ids += ids
        records = _scenes(f30k, split)
        assert [r["index"] for r in records] == list(range(n))
        assert [r["id"] for r in records] == ids
        assert [c for r in records for c in r["captions"]] == caps
        for r, image_boxes in zip(records, boxes, strict=True):
            assert 2 <= len(r["objects"]) <= 6
            # regions come objects first, in the order of the scene record
            assert image_boxes[: len(r["objects"])].tolist() == [o["box"] for o in r["objects"]]
    assert len(set(all_ids)) == len(all_ids)


def test_relations_agree_with_boxes(f30k: Path) -> None:
    checked = Counter()
    for split in SIZES:
        for r in _scenes(f30k, split):
            objs = r["objects"]
            for a, rel, b in r["relations"]:
                (ax, ay), (bx, by) = _centre(objs[a]["box"]), _centre(objs[b]["box"])
                expected = {
                    "left of": ax < bx,
                    "right of": ax > bx,
                    "above": ay < by,
                    "below": ay > by,
                    "in front of": objs[a]["depth"] < objs[b]["depth"],
                    "behind": objs[a]["depth"] > objs[b]["depth"],
                    "next to": True,
                }[rel]
                assert expected, (r["id"], a, rel, b)
                checked[rel] += 1
    assert checked["left of"] + checked["right of"] > 0 and checked["above"] + checked["below"] > 0


def test_coco_test_is_prefix_of_testall(tmp_path: Path) -> None:
    sizes = {"train": 10, "dev": 5, "test": 12, "testall": 30}
    assert generate(tmp_path, variant="coco", seed=1, dim=DIM, sizes=sizes) == sizes
    test, testall = np.load(tmp_path / "test_ims.npy"), np.load(tmp_path / "testall_ims.npy")
    np.testing.assert_array_equal(test, testall[:12])
    np.testing.assert_array_equal(np.load(tmp_path / "test_boxes.npy"), np.load(tmp_path / "testall_boxes.npy")[:12])
    caps = (tmp_path / "test_caps.txt").read_text().splitlines()
    assert caps == (tmp_path / "testall_caps.txt").read_text().splitlines()[:60]
    ids = (tmp_path / "test_ids.txt").read_text().split()
    assert ids == (tmp_path / "testall_ids.txt").read_text().split()[:12]
    other = set((tmp_path / "train_ids.txt").read_text().split()) | set((tmp_path / "dev_ids.txt").read_text().split())
    assert not other & set((tmp_path / "testall_ids.txt").read_text().split())


def test_contrast_pairs_only_in_test_and_about_40_percent(f30k: Path) -> None:
    for split in ("train", "dev"):
        assert all(r["group"] is None and r["contrast"] is None for r in _scenes(f30k, split))
    records = _scenes(f30k, "test")
    pairs = _pairs(records)
    assert sum(r["group"] is not None for r in records) == pytest.approx(0.4 * len(records), abs=2)
    assert {a["contrast"] for a, _ in pairs} == {"attribute_swap", "relation"}
    for a, b in pairs:
        assert b["index"] == a["index"] + 1  # members are adjacent
        assert a["contrast"] == b["contrast"]


def _bag(captions: list[str]) -> Counter:
    return Counter(w for c in captions for w in re.findall(r"[a-z]+", c.lower()))


def test_attribute_swap_pairs_share_objects_but_not_bindings(f30k: Path) -> None:
    pairs = [p for p in _pairs(_scenes(f30k, "test")) if p[0]["contrast"] == "attribute_swap"]
    assert pairs
    attrs = ("colour", "shape", "size", "material")
    for a, b in pairs:
        for attr in attrs:  # the same multiset of values for every attribute ...
            assert Counter(o[attr] for o in a["objects"]) == Counter(o[attr] for o in b["objects"])
        bindings = [
            attr
            for attr in ("colour", "size", "material")
            if Counter((o[attr], o["shape"]) for o in a["objects"])
            != Counter((o[attr], o["shape"]) for o in b["objects"])
        ]
        assert len(bindings) == 1  # ... but exactly one attribute bound to different shapes
        changed = [k for k, (x, y) in enumerate(zip(a["objects"], b["objects"], strict=True)) if x != y]
        assert len(changed) == 2
        assert _bag(a["captions"]) == _bag(b["captions"])  # bag of words cannot tell them apart
        assert set(a["captions"]).isdisjoint(b["captions"])
        attr = bindings[0]
        for own, other in ((a, b), (b, a)):
            for cap in own["captions"]:  # states both own bindings, neither of the partner's
                for k in changed:
                    assert _mentions(cap, own["objects"][k][attr], own["objects"][k]["shape"]), cap
                    assert not _mentions(cap, other["objects"][k][attr], other["objects"][k]["shape"]), cap


_WORDS = {
    "grey": ("grey", "gray"),
    "cube": ("cube", "block"),
    "sphere": ("sphere", "ball"),
    "ring": ("ring", "torus"),
    "small": ("small", "little", "tiny"),
    "large": ("large", "big"),
    "metal": ("metal", "metallic", "shiny"),
    "rubber": ("rubber", "matte"),
    "wood": ("wooden",),
}


def _mentions(caption: str, value: str, shape: str) -> bool:
    """Whether `caption` has a noun phrase with `value` among the adjectives before the `shape` noun."""
    adjectives = r"(?:\w+ ){0,2}"
    for v in _WORDS.get(value, (value,)):
        for s in _WORDS.get(shape, (shape,)):
            if re.search(rf"\b{v} {adjectives}{s}\b", caption.lower()):
                return True
    return False


def test_relation_pairs_swap_one_left_right_relation(f30k: Path) -> None:
    pairs = [p for p in _pairs(_scenes(f30k, "test")) if p[0]["contrast"] == "relation"]
    assert pairs
    for a, b in pairs:
        strip = [{k: v for k, v in o.items() if k != "box"} for o in a["objects"]]
        assert strip == [{k: v for k, v in o.items() if k != "box"} for o in b["objects"]]
        assert [o["box"] == p["box"] for o, p in zip(a["objects"], b["objects"], strict=True)].count(False) == 2
        assert _bag(a["captions"]) == _bag(b["captions"])
        assert set(a["captions"]).isdisjoint(b["captions"])
        horizontal = [t for t in a["relations"] if t[1] in ("left of", "right of")]
        assert horizontal
        for x, rel, y in horizontal:
            assert [y, rel, x] in b["relations"]  # the same words with the roles exchanged
            ax = _centre(a["objects"][x]["box"])[0] - _centre(a["objects"][y]["box"])[0]
            bx = _centre(b["objects"][x]["box"])[0] - _centre(b["objects"][y]["box"])[0]
            assert ax * bx < 0  # and the geometry really flipped


def test_mean_pooled_features_separate_pairs_and_stay_close(f30k: Path) -> None:
    pooled = np.load(f30k / "test_ims.npy").mean(axis=1)
    pairs = _pairs(_scenes(f30k, "test"))
    pair_dist = np.array([np.linalg.norm(pooled[a["index"]] - pooled[b["index"]]) for a, b in pairs])
    n = len(pooled)
    partner = {a["index"]: b["index"] for a, b in pairs} | {b["index"]: a["index"] for a, b in pairs}
    others = [np.linalg.norm(pooled[i] - pooled[j]) for i in range(n) for j in range(i + 1, n) if partner.get(i) != j]
    assert (pair_dist > 1e-3).all()  # the ReLU makes bindings visible even after mean pooling
    assert pair_dist.max() < 0.5 * np.median(others)


def test_resizing_train_leaves_test_unchanged(f30k: Path, tmp_path: Path) -> None:
    generate(tmp_path, seed=3, dim=DIM, sizes={"train": 7, "test": 40})
    for name in ("test_ims.npy", "test_boxes.npy", "test_caps.txt", "test_ids.txt"):
        assert (tmp_path / name).read_bytes() == (f30k / name).read_bytes()
    assert _scenes(tmp_path, "test") == _scenes(f30k, "test")
    assert not (tmp_path / "dev_ims.npy").exists()
    train = np.load(tmp_path / "train_ims.npy")
    np.testing.assert_array_equal(train, np.load(f30k / "train_ims.npy")[:7])


def test_chunked_writing_matches(f30k: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer, "_CHUNK_BYTES", 7 * 36 * DIM * 4)  # 7 images per chunk
    flushes: list[str] = []
    open_memmap = writer.open_memmap

    def counting(path, mode="r+", **kwargs):
        flushes.append(mode)
        return open_memmap(path, mode=mode, **kwargs)

    monkeypatch.setattr(writer, "open_memmap", counting)
    generate(tmp_path, seed=3, dim=DIM, sizes={"train": 60})
    assert flushes.count("r+") == 9  # ceil(60 / 7) chunks were copied into the file
    assert (tmp_path / "train_ims.npy").read_bytes() == (f30k / "train_ims.npy").read_bytes()


def test_render_writes_one_png_per_image(tmp_path: Path) -> None:
    sizes = {"train": 4, "test": 6}
    generate(tmp_path, seed=0, dim=8, sizes=sizes, render=True)
    ids = [line for s in sizes for line in (tmp_path / f"{s}_ids.txt").read_text().split()]
    pngs = sorted((tmp_path / "images").glob("*.png"))
    assert sorted(p.stem for p in pngs) == sorted(ids)
    for png in pngs:
        with Image.open(png) as image:
            assert image.size == (480, 320)
            assert len(image.getcolors(1 << 16)) > 1  # something was drawn


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variant": "cifar"}, "unknown synthetic variant"),
        ({"sizes": {"val": 3}}, "unknown f30k split"),
        ({"sizes": {"train": -1}}, "size of split"),
        ({"dim": 0}, "dim"),
        ({"variant": "coco", "sizes": {"test": 5, "testall": 3}}, "testall"),
    ],
)
def test_bad_arguments_raise_data_error(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        generate(tmp_path / "x", **kwargs)
