"""Which tokenizer turns captions into ids for a model: its word vocabulary, or the BERT wordpiece tokenizer.

Everything that encodes captions (training dataset, evaluation, checkpoint loading) asks `text_tokenizer` with
the model config, so a BERT model reads its own wordpiece vocabulary while GRU models use the dataset's vocabulary
JSON. A tokenizer is anything with `encode(caption) -> list[int]` and `__len__` (the number of ids).
"""

from __future__ import annotations

from typing import Any, Protocol

from itmatch.data.vocab import Vocabulary


class CaptionTokenizer(Protocol):
    def encode(self, caption: str) -> list[int]: ...

    def __len__(self) -> int: ...


def uses_vocab(model_cfg: Any) -> bool:
    """Whether the model reads captions with the dataset's word vocabulary (False: it brings its own tokenizer,
    e.g. BERT's wordpieces), as its method declares."""
    from itmatch.registry import method_spec

    return method_spec(model_cfg.name).uses_vocab(model_cfg)


def text_tokenizer(model_cfg: Any, vocab: Vocabulary | None) -> CaptionTokenizer:
    """The tokenizer for `model_cfg`, as its method declares (`MethodSpec.tokenizer`)."""
    from itmatch.registry import method_spec

    return method_spec(model_cfg.name).tokenizer(model_cfg, vocab)


def extended_vocabulary(vocab: Vocabulary, extra_tokens: tuple[str, ...] | list[str]) -> Vocabulary:
    """`vocab`, copied and extended by the tokens a method appends (e.g. VSE-infinity's `<mask>`)."""
    extra = [t for t in extra_tokens if t not in vocab]
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
