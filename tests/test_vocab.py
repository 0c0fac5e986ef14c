"""Vocabulary: building, encoding, SCAN JSON and VSE++ pickle loading, refusal of unsafe pickles."""

import json
import os
import pickle
import sys
import types
from pathlib import Path

import pytest

from itmatch.data.vocab import (
    SPECIALS,
    Vocabulary,
    build_vocab,
    load_vocab,
    save_vocab,
    vocab_from_captions_files,
)
from itmatch.errors import DataError


def test_new_vocabulary_is_empty_and_add_word_is_idempotent() -> None:
    vocab = Vocabulary()
    assert len(vocab) == 0
    assert vocab.add_word("dog") == 0
    assert vocab.add_word("cat") == 1
    assert vocab.add_word("dog") == 0
    assert len(vocab) == 2 and "cat" in vocab and "cow" not in vocab
    assert vocab.idx2word == {0: "dog", 1: "cat"}


def test_build_vocab_threshold_counted_by_hand() -> None:
    captions = [
        "A dog runs.",  # a dog runs .
        "A dog sits.",  # a dog sits .
        "The dog runs!",  # the dog runs !
        "a cat runs",  # a cat runs
    ]
    # counts: a=3, dog=3, runs=3, .=2, sits=1, the=1, !=1, cat=1
    vocab = build_vocab(captions, threshold=3)
    assert list(vocab.word2idx) == [*SPECIALS, "a", "dog", "runs"]  # specials, then first-occurrence order
    assert [vocab.word2idx[s] for s in SPECIALS] == [0, 1, 2, 3]
    vocab2 = build_vocab(captions, threshold=2)
    assert list(vocab2.word2idx)[4:] == ["a", "dog", "runs", "."]
    assert len(build_vocab(captions)) == 4  # default threshold 4: nothing but the specials


def test_encode_adds_start_end_and_maps_unknown_to_unk() -> None:
    vocab = build_vocab(["a dog runs"] * 4)
    # ids: a=4, dog=5, runs=6
    assert vocab.encode("A dog flies") == [1, 4, 5, 3, 2]
    assert vocab.encode("") == [1, 2]
    assert vocab("zebra") == 3


def test_save_load_round_trip(tmp_path: Path) -> None:
    vocab = build_vocab(["a man's t-shirt, café"] * 4)
    path = tmp_path / "sub" / "vocab.json"
    save_vocab(vocab, path)
    assert sorted(os.listdir(path.parent)) == ["vocab.json"]  # no temporary file left behind
    payload = json.loads(path.read_text(encoding="utf-8"))
    assert set(payload) == {"word2idx", "idx2word", "idx"}
    assert payload["idx"] == len(vocab) and payload["idx2word"]["0"] == "<pad>"
    loaded = load_vocab(path)
    assert loaded.word2idx == vocab.word2idx
    assert loaded.idx2word == vocab.idx2word
    assert loaded.encode("A café") == vocab.encode("A café")


def test_loads_hand_written_scan_json(tmp_path: Path) -> None:
    # As the SCAN originals store it: string idx2word keys, an "idx" counter, ids not in sorted key order.
    text = (
        '{"word2idx": {"zebra": 5, "<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "apple": 6, "man": 4},'
        ' "idx2word": {"0": "<pad>", "1": "<start>", "2": "<end>", "3": "<unk>", "4": "man", "5": "zebra",'
        ' "6": "apple"}, "idx": 7}'
    )
    path = tmp_path / "f30k_precomp_vocab.json"
    path.write_text(text, encoding="utf-8")
    vocab = load_vocab(path)
    assert len(vocab) == 7
    assert vocab("zebra") == 5 and vocab("apple") == 6 and vocab("man") == 4
    assert vocab("dog") == 3
    assert vocab.idx2word[5] == "zebra"
    assert vocab.encode("A man, a zebra") == [1, 3, 4, 3, 3, 5, 2]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ('{"idx2word": {}, "idx": 0}', "no 'word2idx'"),
        ('{"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "dog": 5}}', "cover 0..4"),
        ('{"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "dog": 3}}', "unique"),
        ('{"word2idx": {"<start>": 0, "<pad>": 1, "<end>": 2, "<unk>": 3}}', "<pad> must have id 0"),
        ('{"word2idx": {"<pad>": "0"}}', "integer id"),
        ("[1, 2]", "no 'word2idx'"),
    ],
)
def test_malformed_json_is_a_data_error_naming_the_file(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad_vocab.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=fragment) as info:
        load_vocab(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="vocabulary file not found: .*itmatch data vocab"):
        load_vocab(tmp_path / "nope.json")


@pytest.fixture
def vsepp_vocab_class(monkeypatch: pytest.MonkeyPatch) -> type:
    """A class importable as ``vocab.Vocabulary``, like the one VSE++ pickled."""
    module = types.ModuleType("vocab")

    class Vocabulary:  # mirrors vsepp/vocab.py: plain attributes word2idx, idx2word, idx
        def __init__(self) -> None:
            self.word2idx: dict[str, int] = {}
            self.idx2word: dict[int, str] = {}
            self.idx = 0

        def add_word(self, word: str) -> None:
            self.word2idx[word] = self.idx
            self.idx2word[self.idx] = word
            self.idx += 1

    Vocabulary.__module__ = "vocab"
    Vocabulary.__qualname__ = "Vocabulary"
    module.Vocabulary = Vocabulary  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vocab", module)
    return Vocabulary


@pytest.mark.parametrize("protocol", [0, 1, 2])
def test_loads_vsepp_pickle(tmp_path: Path, vsepp_vocab_class: type, protocol: int) -> None:
    old = vsepp_vocab_class()
    for word in [*SPECIALS, "man", "dog", "t-shirt"]:
        old.add_word(word)
    path = tmp_path / "f30k_vocab.pkl"
    path.write_bytes(pickle.dumps(old, protocol=protocol))
    vocab = load_vocab(path)
    assert isinstance(vocab, Vocabulary)
    assert vocab.word2idx == old.word2idx
    assert vocab.idx2word == old.idx2word
    assert vocab.encode("A man in a t-shirt") == [1, 3, 4, 3, 3, 6, 2]


def test_loads_vsepp_pickle_saved_from_main(tmp_path: Path, vsepp_vocab_class: type) -> None:
    # vsepp's vocab.py was run as a script, so its pickles may name the class __main__.Vocabulary.
    old = vsepp_vocab_class()
    for word in [*SPECIALS, "cat"]:
        old.add_word(word)
    data = pickle.dumps(old, protocol=2).replace(b"cvocab\nVocabulary", b"c__main__\nVocabulary")
    assert b"__main__" in data
    path = tmp_path / "coco_vocab.pkl"
    path.write_bytes(data)
    assert load_vocab(path)("cat") == 4


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned > " + os.environ["ITMATCH_TEST_MARKER"],))


def test_malicious_pickle_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "marker"
    monkeypatch.setenv("ITMATCH_TEST_MARKER", str(marker))
    path = tmp_path / "evil_vocab.pkl"
    path.write_bytes(pickle.dumps(_Evil(), protocol=2))
    with pytest.raises(DataError, match="refusing to load .*evil_vocab.pkl.*system"):
        load_vocab(path)
    assert not marker.exists()


def test_garbage_file_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pkl"
    path.write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match="garbage.pkl"):
        load_vocab(path)


def test_pickle_of_wrong_object_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "dict.pkl"
    path.write_bytes(pickle.dumps({"word2idx": {"<pad>": 0}}, protocol=2))
    with pytest.raises(DataError, match="no VSE\\+\\+ Vocabulary"):
        load_vocab(path)


def test_vocab_from_caption_files(tmp_path: Path) -> None:
    train = tmp_path / "train_caps.txt"
    dev = tmp_path / "dev_caps.txt"
    train.write_bytes("A café.\r\nA café!\n".encode())
    dev.write_bytes("  a CAFÉ  \n\na dog\n".encode())
    vocab = vocab_from_captions_files([train, dev], threshold=3)
    # a=4, café=3, .=1, !=1, dog=1
    assert list(vocab.word2idx)[4:] == ["a", "café"]
    with pytest.raises(DataError, match="caption file not found"):
        vocab_from_captions_files([tmp_path / "missing_caps.txt"])
    bad = tmp_path / "bad_caps.txt"
    bad.write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(DataError, match="bad_caps.txt:2: .*UTF-8"):
        vocab_from_captions_files([bad])
