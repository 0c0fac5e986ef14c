"""Caption tokenisation: words as the reference code's ``nltk.word_tokenize(caption.lower())``, and which tokenizer
turns captions into ids for a model (its word vocabulary, or the BERT wordpiece tokenizer).

``word_tokenize`` splits the text into sentences with the Punkt model, then runs NLTK's Treebank-style word
tokenizer on each sentence. Punkt needs a data download (``punkt``/``punkt_tab``) that is not available
offline, so we run the word tokenizer on the whole caption and imitate the only effect the sentence split
has on the tokens: a sentence-final period followed by another sentence is split off (the word tokenizer
alone splits only the period at the very end of its input). The decision follows Punkt's rules for
lower-cased text: a known abbreviation keeps its period, and so does an initial or a number followed by a
lower-case word. Released vocabularies were built with this tokenizer, so matching it keeps word ids aligned
with checkpoints.

Everything that encodes captions (training dataset, evaluation, checkpoint loading) asks `text_tokenizer` with
the model config, so a BERT model reads its own wordpiece vocabulary while GRU models use the dataset's vocabulary
JSON. A tokenizer (`CaptionTokenizer`) is anything with `encode(caption) -> list[int]` and `__len__` (the number
of ids).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Protocol

from nltk.tokenize.destructive import NLTKWordTokenizer

if TYPE_CHECKING:
    from itmatch.data.vocab import Vocabulary

__all__ = ["ABBREVIATIONS", "CaptionTokenizer", "extended_vocabulary", "text_tokenizer", "tokenize", "uses_vocab",
           "vocab_words"]

# A small subset of Punkt's English abbreviation list: in lower-cased captions Punkt never ends a sentence
# after one of these, because the next word starts with a lower-case letter.
ABBREVIATIONS: frozenset[str] = frozenset(
    {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "prof", "mt", "ave", "e.g", "i.e", "u.s", "u.k"}
)

# Punkt's token classes (nltk.tokenize.punkt.PunktToken): numbers and single-letter initials.
_NUMBER = re.compile(r"^-?[.,]?\d[\d,.-]*\.?$")
_INITIAL = re.compile(r"^[^\W\d]\.$")
# Punkt's "sentences don't start with punctuation" rule.
_PUNCTUATION = frozenset(";:,.!?")

_word_tokenizer = NLTKWordTokenizer()


def _ends_sentence(token: str, next_token: str) -> bool:
    """Whether Punkt would end a sentence after ``token`` (which ends in one period) given the next token."""
    stem = token[:-1]
    if stem in ABBREVIATIONS or stem.split("-")[-1] in ABBREVIATIONS:
        return False
    if "." in stem:
        # Dotted forms such as "u.s.a." are abbreviations for Punkt's purposes.
        return False
    if _NUMBER.match(token) or _INITIAL.match(token):
        # Punkt's orthographic heuristic: a lower-case next word (or punctuation) does not start a sentence.
        next_is_lower = next_token[:1].islower()
        return not (next_is_lower or next_token in _PUNCTUATION)
    return True


def tokenize(caption: str) -> list[str]:
    """Lower-case and tokenise a caption exactly as ``nltk.word_tokenize(caption.lower())`` would.

    ``"A man's T-shirt isn't red."`` gives ``['a', 'man', "'s", 't-shirt', 'is', "n't", 'red', '.']``.
    Double quotes become the Treebank opening/closing forms. An empty or whitespace-only caption gives ``[]``
    (callers decide whether to reject it).
    """
    if not isinstance(caption, str):
        raise TypeError(f"tokenize() expects str, not {type(caption).__name__}; decode bytes as UTF-8 first")
    tokens = _word_tokenizer.tokenize(caption.lower())
    out: list[str] = []
    last = len(tokens) - 1
    for i, token in enumerate(tokens):
        if (
            i < last
            and len(token) > 1
            and token.endswith(".")
            and not token.endswith("..")
            and _ends_sentence(token, tokens[i + 1])
        ):
            out.extend((token[:-1], "."))
        else:
            out.append(token)
    return out


# -------------------------------------------------------------------------------------------- caption -> ids


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
    from itmatch.data.vocab import Vocabulary  # vocab.py imports tokenize(): a module-level import would be a cycle

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
    from itmatch.data.vocab import Vocabulary

    if isinstance(tokenizer, Vocabulary):
        return [tokenizer.idx2word[i] for i in range(len(tokenizer))]
    return []
