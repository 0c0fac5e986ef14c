import os
import resource
from pathlib import Path

import numpy as np
import pytest

from itmatch.data.npy import MappedArray, read_npy_header
from itmatch.data.precomp import (
    CHECKPOINT_VOCAB_HINT,
    CaptionDataset,
    PrecompSplit,
    collate,
    find_vocab,
    load_split,
    resolve_root,
)
from itmatch.data.vocab import load_vocab, save_vocab
from itmatch.errors import DataError
from tests.conftest import write_tiny_dataset, write_vsepp_pickle


def test_scan_layout_reads_features_captions_and_ids(tiny_data: Path) -> None:
    split, vocab = load_split(tiny_data, "train")
    feats = np.load(tiny_data / "train_ims.npy")
    caps = (tiny_data / "train_caps.txt").read_text().splitlines()
    assert split.n_images == 40 and split.n_captions == 200 and split.im_div == 5
    assert split.captions == caps
    assert split.ids == list(range(1000, 1040))
    ds = CaptionDataset(split, vocab)
    for k in (0, 4, 5, 199):
        img, tokens, idx, row = ds[k]
        assert row == k // 5 and idx == k
        np.testing.assert_array_equal(img, feats[k // 5])
        assert tokens[0] == vocab("<start>") and tokens[-1] == vocab("<end>")
        assert tokens == vocab.encode(caps[k])


def test_vse_infinity_layout(tmp_path: Path) -> None:
    write_tiny_dataset(tmp_path / "f30k" / "precomp", {"train": 5, "test": 5})
    (tmp_path / "vocab").mkdir()
    os.replace(tmp_path / "f30k" / "precomp" / "vocab.json", tmp_path / "vocab" / "f30k_precomp_vocab.json")
    root = resolve_root(tmp_path / "f30k", "test")
    assert root == tmp_path / "f30k" / "precomp"
    assert find_vocab(root) == tmp_path / "vocab" / "f30k_precomp_vocab.json"
    split, vocab = load_split(tmp_path / "f30k", "test")
    assert split.n_images == 5 and len(vocab) > 4


def test_scan_vocab_location(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "f30k_precomp", {"train": 3})
    (tmp_path / "vocab").mkdir()
    os.replace(root / "vocab.json", tmp_path / "vocab" / "f30k_precomp_vocab.json")
    assert find_vocab(root) == tmp_path / "vocab" / "f30k_precomp_vocab.json"


def test_dev_is_truncated_to_5000_captions(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "d", {"dev": 1014}, regions=1, dim=2)
    split = PrecompSplit(root, "dev")
    assert split.n_captions == 5000 and split.n_images == 1000
    test = PrecompSplit(root, "dev", truncate_dev=False)
    assert test.n_captions == 5070


def test_one_image_row_per_caption(tmp_path: Path) -> None:
    root = tmp_path / "tencrop"
    root.mkdir()
    np.save(root / "x_ims.npy", np.arange(10 * 3, dtype=np.float32).reshape(10, 3))
    (root / "x_caps.txt").write_text("\n".join(f"caption {i}" for i in range(10)) + "\n")
    split = PrecompSplit(root, "x")
    assert split.im_div == 1 and split.image_of(7) == 7


def test_collate_sorts_by_length_descending_and_pads(tiny_data: Path) -> None:
    split, vocab = load_split(tiny_data, "train")
    ds = CaptionDataset(split, vocab)
    batch = collate([ds[k] for k in range(12)])
    lengths = batch.lengths.tolist()
    assert lengths == sorted(lengths, reverse=True)
    for row, k in enumerate(batch.ids.tolist()):
        tokens = ds.tokens[k]
        assert batch.captions[row, : len(tokens)].tolist() == tokens
        assert batch.captions[row, len(tokens) :].abs().sum() == 0
    # the fancy-indexed batch read gives the same batch
    other = ds.batch(list(range(12)))
    assert other.ids.tolist() == batch.ids.tolist()
    np.testing.assert_array_equal(other.images.numpy(), batch.images.numpy())


def _rss_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def test_reading_does_not_load_the_array(tmp_path: Path) -> None:
    path = tmp_path / "big_ims.npy"
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(4000, 36, 512))  # 295 MB
    for start in range(0, 4000, 500):
        arr[start : start + 500] = np.float32(start)
    arr.flush()
    del arr
    before = _rss_kb()
    mapped = MappedArray(path, release_bytes=8 << 20)
    assert isinstance(mapped.array.base, type(mapped._map)) or mapped.array.base is mapped._map
    rows = [mapped[i] for i in range(0, 4000, 7)]  # touches ~84 MB of the file
    grown_mb = (_rss_kb() - before) / 1024
    assert rows[1][0, 0] == 0.0 and mapped[3999][0, 0] == 3500.0
    assert grown_mb < 60, f"RSS grew by {grown_mb:.0f} MB while reading a 295 MB mapped file"


def test_truncated_and_corrupt_npy_are_clear_errors(tmp_path: Path) -> None:
    good = tmp_path / "a_ims.npy"
    np.save(good, np.ones((4, 3, 2), dtype=np.float32))
    trunc = tmp_path / "b_ims.npy"
    trunc.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_npy_header(trunc)
    junk = tmp_path / "c_ims.npy"
    junk.write_bytes(b"not an npy file at all")
    with pytest.raises(DataError, match="not a valid .npy"):
        read_npy_header(junk)
    with pytest.raises(DataError, match="missing file"):
        read_npy_header(tmp_path / "nope.npy")


@pytest.mark.parametrize("problem,match", [
    ("count", "captions for 3 images"),
    ("empty", "empty caption"),
    ("shape", "expected float features"),
    ("utf8", "not valid UTF-8"),
])
def test_bad_splits_raise_one_line(tmp_path: Path, problem: str, match: str) -> None:
    root = write_tiny_dataset(tmp_path / "bad", {"train": 3})
    caps = (root / "train_caps.txt").read_text().splitlines()
    if problem == "count":
        (root / "train_caps.txt").write_text("\n".join(caps[:-1]) + "\n")
    elif problem == "empty":
        caps[4] = "   "
        (root / "train_caps.txt").write_text("\n".join(caps) + "\n")
    elif problem == "shape":
        np.save(root / "train_ims.npy", np.zeros((3, 2, 2, 2), dtype=np.float32))
    elif problem == "utf8":
        (root / "train_caps.txt").write_bytes(b"\xff\xfe bad\n" * 15)
    with pytest.raises(DataError, match=match) as info:
        PrecompSplit(root, "train")
    assert "\n" not in str(info.value)


def test_missing_dataset_and_vocab(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        resolve_root(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no train_ims.npy"):
        resolve_root(tmp_path / "empty")
    root = write_tiny_dataset(tmp_path / "nv", {"train": 2})
    (root / "vocab.json").unlink()
    with pytest.raises(DataError, match="itmatch data vocab"):
        find_vocab(root)
    assert load_vocab  # imported API


@pytest.mark.parametrize("layout", ["scan", "vse_infinity"])
def test_a_pickled_vocabulary_alone_is_found(tmp_path: Path, layout: str) -> None:
    # VSE++ and VSRN releases ship only vocab/f30k_precomp_vocab.pkl next to the data folder.
    if layout == "scan":
        root = write_tiny_dataset(tmp_path / "f30k_precomp", {"test": 2})
    else:
        root = write_tiny_dataset(tmp_path / "f30k" / "precomp", {"test": 2})
    (root / "vocab.json").unlink()
    pkl = write_vsepp_pickle(tmp_path / "vocab" / "f30k_precomp_vocab.pkl", ["<pad>", "<start>", "<end>", "<unk>", "a"])
    assert find_vocab(root) == pkl
    assert load_vocab(find_vocab(root))("a") == 4
    save_vocab(load_vocab(pkl), tmp_path / "vocab" / "f30k_precomp_vocab.json")
    assert find_vocab(root).suffix == ".json"  # the JSON, where both exist, as before


def test_missing_vocabulary_hint_is_the_callers(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "nv", {"train": 2})
    (root / "vocab.json").unlink()
    with pytest.raises(DataError, match=r"itmatch data vocab .*nv` or pass --set data.vocab=PATH$"):
        find_vocab(root)
    with pytest.raises(DataError, match=r"--vocab PATH") as info:
        find_vocab(root, hint=CHECKPOINT_VOCAB_HINT)
    assert "--set" not in str(info.value) and "vocab.pkl" in str(info.value)
