"""VSE-infinity's training augmentations, drawn from an explicit generator so that resumed runs replay them.

Upstream (woodfrog/vse_infty @ 29df9d6 and branch bigru @ 8600f89, `lib/datasets/image_caption.py`):
* size augmentation: each region of a training image is kept iff U[0,1) > 0.2, in its original order, with no
  minimum; batches are then zero-padded to the longest image and carry the image lengths (GPO masks the rest);
* word augmentation: one U[0,1) draw u per word; u < 0.2 selects the word, and then v = u / 0.2 decides:
  v < 0.5 every piece becomes the mask token, v < 0.6 every piece becomes an independent uniformly random id of
  the whole vocabulary, else the word is deleted (the in-code comment says "keep", the code deletes). BERT words
  are the basic tokenizer's words (all their pieces together), [CLS]/[SEP] never change; the BiGRU branch treats
  every token as a word, <start> and <end> included, and its mask token is the `<mask>` appended to the vocabulary.
"""

from __future__ import annotations

import numpy as np
import torch

from itmatch.data.precomp import Batch, CaptionDataset, collate
from itmatch.data.tokenize import CaptionTokenizer
from itmatch.data.vocab import Vocabulary
from itmatch.errors import ConfigError

MASK = "<mask>"


def kept_regions(n_regions: int, drop: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of the regions kept when each is dropped with probability `drop`."""
    keep = np.flatnonzero(rng.random(n_regions) > drop)
    # Upstream has no minimum and would crash on an empty image (probability drop ** 36); keep them all then.
    return keep if len(keep) else np.arange(n_regions)


def noisy_words(words: list[list[int]], p: float, *, mask_id: int, vocab_size: int,
                rng: np.random.Generator) -> list[int]:
    """Ids of `words` after the word augmentation with selection probability `p` (0.2 upstream)."""
    out: list[int] = []
    for pieces in words:
        u = rng.random()
        if u >= p:
            out.extend(pieces)
        elif u / p < 0.5:
            out.extend([mask_id] * len(pieces))
        elif u / p < 0.6:
            out.extend(int(i) for i in rng.integers(vocab_size, size=len(pieces)))
    return out


class AugmentedCaptions:
    """Builds training batches of a `CaptionDataset` with region dropping and word noise."""

    def __init__(self, dataset: CaptionDataset, tokenizer: CaptionTokenizer, *, region_drop: float = 0.0,
                 word_noise: float = 0.0) -> None:
        self.dataset, self.region_drop, self.word_noise = dataset, region_drop, word_noise
        self.vocab_size = len(tokenizer)
        if isinstance(tokenizer, Vocabulary):
            if word_noise and MASK not in tokenizer:
                raise ConfigError(f"train.word_noise needs a {MASK} token in the vocabulary; this model has none")
            self.mask_id = tokenizer.word2idx.get(MASK, -1)
            self.prefix, self.suffix = [], []
            self.words = [[[t] for t in tokens] for tokens in dataset.tokens]
        else:  # a BERT wordpiece tokenizer
            self.mask_id = tokenizer.mask_id
            self.prefix, self.suffix = [tokenizer.cls_id], [tokenizer.sep_id]
            self.words = [tokenizer.words(c)[1] for c in dataset.split.captions]

    def caption(self, k: int, rng: np.random.Generator) -> list[int]:
        if not self.word_noise:
            return self.dataset.tokens[k]
        ids = noisy_words(self.words[k], self.word_noise, mask_id=self.mask_id, vocab_size=self.vocab_size, rng=rng)
        # An empty BiGRU caption (every token deleted) would crash upstream's packed GRU; keep the caption then.
        return [*self.prefix, *ids, *self.suffix] if ids or self.prefix else self.dataset.tokens[k]

    def batch(self, indices: list[int], rng: np.random.Generator) -> Batch:
        """The batch of captions `indices` (sorted by caption length as `collate`), with `image_lengths`."""
        rows = [self.dataset.image_row(k) for k in indices]
        feats, kept = self.dataset.split.training_images(rows, rng)  # (B, R, D) features or (B, 3, S, S) images
        rows, indices = [rows[i] for i in kept], [indices[i] for i in kept]
        images, tokens = [], []
        for i, k in enumerate(indices):
            image = feats[i]
            if self.region_drop:
                image = image[kept_regions(len(image), self.region_drop, rng)]
            images.append(image)
            tokens.append(self.caption(k, rng))
        order = sorted(range(len(indices)), key=lambda i: len(tokens[i]), reverse=True)  # as collate, stable
        if feats.ndim == 4:  # raw images (B, 3, S, S): grid-size augmentation happens in the model
            return collate([(images[i], tokens[i], indices[i], rows[i]) for i in order])
        width = max(len(im) for im in images)
        padded = [np.pad(im, ((0, width - len(im)), (0, 0))) for im in images]
        batch = collate([(padded[i], tokens[i], indices[i], rows[i]) for i in order])
        batch.image_lengths = torch.tensor([len(images[i]) for i in order], dtype=torch.long)
        return batch
