"""BERT captions: the slow (basic + wordpiece) tokenizer of a local BERT directory, as VSE-infinity and HREM use it.

Upstream (woodfrog/vse_infty @ 29df9d6, `lib/datasets/image_caption.py:process_caption`) tokenises word by word
so that its training augmentation can mask, replace or delete whole words: `basic_tokenizer` splits the caption
into words (lower-case, accents stripped, punctuation split), `wordpiece_tokenizer` splits each word into pieces,
and the ids are `[CLS] + pieces + [SEP]`, never truncated. For ordinary captions this equals the fast tokenizer.
"""

from __future__ import annotations

from itmatch.modules.text_bert import resolve_bert_path


def _slow_tokenizer_class() -> type:
    try:  # transformers 5: the tokenizers-backed BertTokenizer has no basic/wordpiece parts; the slow one moved
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

        return BertTokenizerLegacy
    except ImportError:  # transformers 4: BertTokenizer is the slow one
        from transformers import BertTokenizer

        return BertTokenizer


class WordpieceTokenizer:
    """`encode(caption) -> ids` with [CLS]/[SEP]; `words(caption)` gives the pieces grouped by word."""

    def __init__(self, bert_path: str) -> None:
        path = resolve_bert_path(bert_path)
        self._tok = _slow_tokenizer_class().from_pretrained(str(path), local_files_only=True)
        ids = self._tok.convert_tokens_to_ids
        self.cls_id, self.sep_id, self.mask_id = ids("[CLS]"), ids("[SEP]"), ids("[MASK]")
        self._size = len(self._tok.vocab)

    def __len__(self) -> int:
        return self._size

    def words(self, caption: str) -> tuple[list[int], list[list[int]], list[int]]:
        """(prefix [CLS], piece ids of each word, suffix [SEP]); augmentation acts on the middle part only."""
        pieces = [self._tok.wordpiece_tokenizer.tokenize(w) for w in self._tok.basic_tokenizer.tokenize(caption)]
        return [self.cls_id], [self._tok.convert_tokens_to_ids(p) for p in pieces], [self.sep_id]

    def encode(self, caption: str) -> list[int]:
        prefix, words, suffix = self.words(caption)
        return [*prefix, *(i for word in words for i in word), *suffix]
