"""Which tokenizer turns captions into ids for a model: its word vocabulary, or the BERT wordpiece tokenizer.

Everything that encodes captions (training dataset, evaluation, checkpoint loading) asks `text_tokenizer` with
the model config, so a BERT model reads its own wordpiece vocabulary while GRU models use the dataset's vocabulary
JSON. A tokenizer is anything with `encode(caption) -> list[int]` and `__len__` (the number of ids).
"""

from __future__ import annotations

from typing import Any, Protocol

from itmatch.data.vocab import Vocabulary
from itmatch.errors import ConfigError


class CaptionTokenizer(Protocol):
    def encode(self, caption: str) -> list[int]: ...

    def __len__(self) -> int: ...


def uses_vocab(model_cfg: Any) -> bool:
    """Whether the model reads captions with a word vocabulary (False: it brings its own BERT tokenizer)."""
    return getattr(model_cfg, "text_encoder", "") != "bert"


def text_tokenizer(model_cfg: Any, vocab: Vocabulary | None) -> CaptionTokenizer:
    """The tokenizer for `model_cfg`: BERT wordpiece from `model_cfg.bert_path`, else `vocab` (copied and extended
    by the tokens the method appends, its config class's `extra_tokens`, e.g. VSE-infinity's `<mask>`)."""
    if not uses_vocab(model_cfg):
        from itmatch.data.wordpiece import WordpieceTokenizer

        return WordpieceTokenizer(model_cfg.bert_path)
    if vocab is None:
        raise ConfigError(f"model {model_cfg.name!r} needs a word vocabulary (pass --vocab or --set data.vocab=PATH)")
    extra = [t for t in getattr(type(model_cfg), "extra_tokens", ()) if t not in vocab]
    if not extra:
        return vocab
    out = Vocabulary()
    for i in range(len(vocab)):
        out.add_word(vocab.idx2word[i])
    for token in extra:
        out.add_word(token)
    return out


def vocab_words(tokenizer: CaptionTokenizer) -> list[str]:
    """The words of a vocabulary tokenizer in id order (stored in native checkpoints); [] for BERT tokenizers."""
    if isinstance(tokenizer, Vocabulary):
        return [tokenizer.idx2word[i] for i in range(len(tokenizer))]
    return []
