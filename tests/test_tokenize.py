"""Tokenizer: hand-written expected tokens following NLTK's Treebank rules plus Punkt's sentence split."""

import pytest

from itmatch.data.tokenize import tokenize

CASES = [
    # clitics: possessive 's, n't split off; "can't" becomes "ca" + "n't" in the Treebank rules
    (
        "A man's dog isn't happy, he can't run.",
        ["a", "man", "'s", "dog", "is", "n't", "happy", ",", "he", "ca", "n't", "run", "."],
    ),
    ("don't won't", ["do", "n't", "wo", "n't"]),
    ("the dogs' bowl", ["the", "dogs", "'", "bowl"]),
    # hyphenated words, decimals, thousands separators and plain numbers stay whole
    (
        "A woman in a T-shirt holds 3.5 kg of apples, 1,000 grapes and 2 pears.",
        ["a", "woman", "in", "a", "t-shirt", "holds", "3.5", "kg", "of", "apples", ",", "1,000", "grapes",
         "and", "2", "pears", "."],
    ),
    # double quotes become `` and ''
    ('A sign says "STOP" in red.', ["a", "sign", "says", "``", "stop", "''", "in", "red", "."]),
    # leading, trailing, repeated and tab whitespace
    ("  Two   dogs\tplay  in the  snow  ", ["two", "dogs", "play", "in", "the", "snow"]),
    ("a man's  hat. ", ["a", "man", "'s", "hat", "."]),
    # parentheses and an ellipsis
    ("A cat (black) sits on a mat...", ["a", "cat", "(", "black", ")", "sits", "on", "a", "mat", "..."]),
    ("wait... a dog", ["wait", "...", "a", "dog"]),
    # ?! are two tokens
    ("What is that?!", ["what", "is", "that", "?", "!"]),
    # several sentences: every sentence-final period is its own token (Punkt split)
    ("A dog runs. A cat sits.", ["a", "dog", "runs", ".", "a", "cat", "sits", "."]),
    ('He said "hi." Then left', ["he", "said", "``", "hi", ".", "''", "then", "left"]),
    # abbreviations keep their period inside a sentence
    ("Mr. Smith waits at St. Paul.", ["mr.", "smith", "waits", "at", "st.", "paul", "."]),
    ("the u.s. flag. a dog", ["the", "u.s.", "flag", ".", "a", "dog"]),
    # a period glued to the next word is not a sentence end
    ("hello.world now", ["hello.world", "now"]),
]


@pytest.mark.parametrize(("caption", "expected"), CASES)
def test_tokenize_matches_treebank_rules(caption: str, expected: list[str]) -> None:
    assert tokenize(caption) == expected


@pytest.mark.parametrize("caption", ["", " ", "\t \n "])
def test_empty_caption_gives_no_tokens(caption: str) -> None:
    assert tokenize(caption) == []


def test_lowercases_before_tokenizing() -> None:
    assert tokenize("ISN'T") == ["is", "n't"]


def test_rejects_bytes() -> None:
    with pytest.raises(TypeError, match="decode"):
        tokenize(b"a dog")  # type: ignore[arg-type]
