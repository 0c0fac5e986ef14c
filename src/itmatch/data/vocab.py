"""Word vocabulary for the GRU text encoders (VSE++, SCAN, VSRN, GSMN, VSE∞ bigru, HREM bigru).

Word ids index the rows of a checkpoint's embedding matrix, so a released checkpoint is only usable with the
vocabulary it was trained with. We therefore read both released formats, SCAN/VSE∞ JSON files and VSE++
pickled ``Vocabulary`` objects (through a restricted unpickler, since a pickle can run arbitrary code), and
write the SCAN JSON format.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from itmatch.data.safe_pickle import AllowListUnpickler
from itmatch.data.tokenize import tokenize
from itmatch.errors import DataError
from itmatch.fileio import atomic_write

VOCAB_THRESHOLD = 4  # the originals keep words seen at least 4 times in train+dev

__all__ = [
    "END",
    "PAD",
    "SPECIALS",
    "START",
    "UNK",
    "Vocabulary",
    "build_vocab",
    "load_vocab",
    "save_vocab",
    "vocab_from_captions_files",
]

PathLike = str | os.PathLike[str]

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS: tuple[str, ...] = (PAD, START, END, UNK)  # ids 0, 1, 2, 3 in every released vocabulary

_BUILD_HINT = "build one with `itmatch data vocab DIR`"


class Vocabulary:
    """Two-way mapping between words and integer ids; unknown words map to ``<unk>``.

    A new instance is empty: :func:`build_vocab` and :func:`load_vocab` add the special tokens themselves.
    """

    def __init__(self) -> None:
        self.word2idx: dict[str, int] = {}
        self.idx2word: dict[int, str] = {}

    def add_word(self, word: str) -> int:
        """Append ``word`` with the next free id (no-op if present) and return its id."""
        idx = self.word2idx.get(word)
        if idx is None:
            idx = len(self.word2idx)
            self.word2idx[word] = idx
            self.idx2word[idx] = word
        return idx

    def __call__(self, word: str) -> int:
        """Id of ``word``, or the ``<unk>`` id for words outside the vocabulary."""
        idx = self.word2idx.get(word)
        if idx is not None:
            return idx
        try:
            return self.word2idx[UNK]
        except KeyError:
            raise KeyError(f"word {word!r} is unknown and the vocabulary has no {UNK}") from None

    def __len__(self) -> int:
        return len(self.word2idx)

    def __contains__(self, word: object) -> bool:
        return word in self.word2idx

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words)"

    def encode(self, caption: str) -> list[int]:
        """Token ids of a raw caption framed as the reference code does: ``[<start>] + words + [<end>]``."""
        return [self.word2idx[START], *(self(token) for token in tokenize(caption)), self.word2idx[END]]


def build_vocab(captions: Iterable[str], threshold: int = VOCAB_THRESHOLD) -> Vocabulary:
    """Vocabulary of the special tokens plus every token seen at least ``threshold`` times in ``captions``.

    The references keep words with count >= 4 over the train+dev captions.
    """
    counter: Counter[str] = Counter()
    for caption in captions:
        counter.update(tokenize(caption))
    vocab = Vocabulary()
    for special in SPECIALS:
        vocab.add_word(special)
    # The originals added words in Counter iteration order, which under Python 2 was hash order and cannot be
    # reproduced; we use first-occurrence order (Counter preserves insertion order), which is deterministic.
    for word, count in counter.items():
        if count >= threshold:
            vocab.add_word(word)
    return vocab


def _read_caption_lines(path: Path) -> Iterator[str]:
    """Yield the stripped captions of a UTF-8 caption file, one per line."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise DataError(f"caption file not found: {path}; check the dataset directory") from None
    with handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                yield raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise DataError(
                    f"{path}:{line_no}: caption is not valid UTF-8; re-encode the file as UTF-8"
                ) from None


def vocab_from_captions_files(paths: Sequence[PathLike], threshold: int = VOCAB_THRESHOLD) -> Vocabulary:
    """Build a vocabulary from caption files (one caption per line, e.g. train_caps.txt + dev_caps.txt)."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]

    def captions() -> Iterator[str]:
        for path in paths:
            yield from _read_caption_lines(Path(path))

    return build_vocab(captions(), threshold=threshold)


def save_vocab(vocab: Vocabulary, path: PathLike) -> None:
    """Write ``vocab`` as SCAN-format JSON, atomically (a crash never leaves a truncated file behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "word2idx": vocab.word2idx,
        "idx2word": {str(idx): word for idx, word in vocab.idx2word.items()},
        "idx": len(vocab),
    }
    atomic_write(path, lambda fh: fh.write(json.dumps(payload).encode("utf-8")))


class _PickledVocabulary:
    """Inert stand-in for the VSE++ ``vocab.Vocabulary`` class: it only receives the pickled attributes."""


def _reconstructor(cls: type, base: type, state: object) -> object:
    """Safe stand-in for ``copyreg._reconstructor`` (protocol 0/1 pickles), limited to our stand-in class."""
    if cls is not _PickledVocabulary or base is not object or state is not None:
        raise pickle.UnpicklingError("unexpected copyreg._reconstructor call")
    return object.__new__(cls)


class _VocabUnpickler(AllowListUnpickler):
    """Unpickler that can only rebuild a plain object carrying ``word2idx``/``idx2word``/``idx``."""

    ALLOWED = {
        ("vocab", "Vocabulary"): _PickledVocabulary,
        ("__main__", "Vocabulary"): _PickledVocabulary,
        ("copy_reg", "_reconstructor"): _reconstructor,
        ("copyreg", "_reconstructor"): _reconstructor,
        ("__builtin__", "object"): object,
        ("builtins", "object"): object,
    }
    EXPECTED = "a VSE++ vocabulary (use a trusted vocabulary file)"


def _check_word2idx(word2idx: object, path: Path) -> dict[str, int]:
    """Validate a word->id mapping: string words, ids exactly 0..n-1, special tokens at ids 0..3."""
    if not isinstance(word2idx, dict) or not word2idx:
        raise DataError(f"vocabulary file {path}: 'word2idx' must be a non-empty mapping; rebuild it")
    for word, idx in word2idx.items():
        if not isinstance(word, str) or isinstance(idx, bool) or not isinstance(idx, int):
            raise DataError(
                f"vocabulary file {path}: entry {word!r}: {idx!r} is not a word -> integer id; rebuild it"
            )
    ids = sorted(word2idx.values())
    if ids != list(range(len(ids))):
        raise DataError(
            f"vocabulary file {path}: word ids must be unique and cover 0..{len(ids) - 1}; rebuild it"
        )
    for expected, special in enumerate(SPECIALS):
        if word2idx.get(special) != expected:
            raise DataError(
                f"vocabulary file {path}: special token {special} must have id {expected} "
                f"(found {word2idx.get(special)}); rebuild the vocabulary"
            )
    return word2idx


def _from_word2idx(word2idx: dict[str, int]) -> Vocabulary:
    vocab = Vocabulary()
    for word, idx in sorted(word2idx.items(), key=lambda item: item[1]):
        vocab.word2idx[word] = idx
        vocab.idx2word[idx] = word
    return vocab


def _load_json(data: bytes, path: Path) -> Vocabulary:
    try:
        payload = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"vocabulary file {path} is not valid JSON ({exc}); rebuild it") from None
    if not isinstance(payload, dict) or "word2idx" not in payload:
        raise DataError(f"vocabulary file {path} has no 'word2idx' key; expected the SCAN vocabulary JSON")
    # word2idx is authoritative: the reference pipeline never reads idx2word (string keys after JSON).
    return _from_word2idx(_check_word2idx(payload["word2idx"], path))


def _load_pickle(data: bytes, path: Path) -> Vocabulary:
    try:
        obj = _VocabUnpickler(io.BytesIO(data), path).load()
    except DataError:
        raise
    except Exception as exc:  # a corrupt pickle fails in many ways (EOFError, UnpicklingError, TypeError...)
        raise DataError(
            f"vocabulary file {path} is neither SCAN JSON nor a readable VSE++ pickle ({exc}); rebuild it"
        ) from None
    if not isinstance(obj, _PickledVocabulary) or "word2idx" not in vars(obj):
        raise DataError(f"vocabulary file {path} holds no VSE++ Vocabulary object; pass a vocabulary file")
    return _from_word2idx(_check_word2idx(vars(obj)["word2idx"], path))


def load_vocab(path: PathLike) -> Vocabulary:
    """Load a vocabulary saved as SCAN/VSE∞ JSON or as a VSE++ ``*_vocab.pkl`` pickle.

    Files named ``*.json`` or starting with ``{``/``[`` are read as JSON, anything else as a pickle.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"vocabulary file not found: {path}; {_BUILD_HINT}") from None
    except IsADirectoryError:
        raise DataError(f"vocabulary path {path} is a directory; pass the vocabulary JSON/PKL file") from None
    if path.suffix.lower() == ".json" or data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] in (b"{", b"["):
        return _load_json(data, path)
    return _load_pickle(data, path)


def write_vocab(root: str | os.PathLike, threshold: int = VOCAB_THRESHOLD,
                out: str | os.PathLike | None = None) -> int:
    """Build the vocabulary of a dataset directory from its train + dev captions (words seen `threshold` times,
    as the originals) and save it as `vocab.json` next to them (or `out`); returns its size."""
    from itmatch.data.precomp import resolve_root

    split_root = resolve_root(root, "train")
    files = [split_root / f"{s}_caps.txt" for s in ("train", "dev") if (split_root / f"{s}_caps.txt").is_file()]
    vocab = vocab_from_captions_files(files, threshold=threshold)
    save_vocab(vocab, out or split_root / "vocab.json")
    return len(vocab)
