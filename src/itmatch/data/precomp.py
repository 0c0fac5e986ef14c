"""Readers for precomputed region features in the two layouts found in the wild.

SCAN layout: ``DATA/{f30k,coco}_precomp/{split}_ims.npy`` (N, 36, D) float32 plus ``{split}_caps.txt`` (5 lines per
image, image of caption k = k // 5), optional ``{split}_ids.txt`` and ``{split}_boxes.npy``.
VSE-infinity layout: ``DATA/{f30k,coco}/precomp/`` with the same files. Both are read by `PrecompSplit`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itmatch.data.layout import CAPTIONS_PER_IMAGE
from itmatch.data.npy import MappedArray
from itmatch.data.vocab import Vocabulary, load_vocab
from itmatch.errors import DataError

DEV_CAPTIONS = 5000  # the originals cut `dev` to its first 5000 captions (1000 images), F30K and COCO alike


def resolve_root(path: str | os.PathLike, split: str = "train") -> Path:
    """Directory holding `{split}_ims.npy`: the path itself (SCAN) or its `precomp/` child (VSE-infinity)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data directory not found: {root}; create one with `itmatch data synth --out {root}`")
    for candidate in (root, root / "precomp"):
        if (candidate / f"{split}_ims.npy").is_file() or (candidate / f"{split}_caps.txt").is_file():
            return candidate
    raise DataError(
        f"no {split}_ims.npy in {root} or {root / 'precomp'}; expected the SCAN layout DIR/{split}_ims.npy "
        f"or the VSE-infinity layout DIR/precomp/{split}_ims.npy"
    )


TRAIN_VOCAB_HINT = "build one with `itmatch data vocab {root}` or pass --set data.vocab=PATH"
CHECKPOINT_VOCAB_HINT = (
    "pass the vocabulary the checkpoint was trained with as --vocab PATH (its .json or the original's .pkl; "
    "one built by `itmatch data vocab` has other ids)"
)


def find_vocab(root: Path, explicit: str = "", *, hint: str = TRAIN_VOCAB_HINT) -> Path:
    """Locate the vocabulary of a dataset directory: `explicit`, or the originals' places, each as SCAN's JSON
    or VSE++'s pickle (`.pkl`, also shipped with the VSRN releases). `hint` ends the error message with what
    works for the calling command (`{root}` is filled in)."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise DataError(f"vocabulary file not found: {path}")
        return path
    stems = [root / "vocab", root.parent / "vocab" / f"{root.name}_vocab"]
    if root.name == "precomp":  # VSE-infinity: data/f30k/precomp -> data/vocab/f30k_precomp_vocab.json
        stems.append(root.parent.parent / "vocab" / f"{root.parent.name}_precomp_vocab")
    candidates = [stem.with_name(stem.name + ext) for stem in stems for ext in (".json", ".pkl")]
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(
        f"no vocabulary found for {root} (looked for {', '.join(str(c) for c in candidates)}); "
        + hint.format(root=root)
    )


MAX_CAPTION_CHARS = 5000  # longer lines are not captions (a 10 MB line made evaluation allocate hundreds of GB)


def read_captions(path: Path) -> list[str]:
    """One caption per line, UTF-8, stripped (the originals read bytes and decode UTF-8)."""
    if not path.is_file():
        raise DataError(f"missing file: {path}")
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8; re-save the captions as UTF-8") from None
    lines = raw.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    too_long = next((k for k, line in enumerate(lines) if len(line) > MAX_CAPTION_CHARS), None)
    if too_long is not None:
        raise DataError(f"{path}:{too_long + 1}: a caption of {len(lines[too_long])} characters (the limit is "
                        f"{MAX_CAPTION_CHARS}); is this a captions file, one caption per line?")
    return [line.strip() for line in lines]


class PrecompSplit:
    """One split of a precomputed-feature dataset: mapped image features + captions (+ ids, boxes)."""

    def __init__(self, root: str | os.PathLike, split: str, *, truncate_dev: bool = True, max_images: int = 0) -> None:
        self.root = Path(root)
        self.split = split
        self.images = MappedArray(self.root / f"{split}_ims.npy")
        if self.images.ndim not in (2, 3) or self.images.dtype.kind != "f":
            raise DataError(
                f"{self.images.path}: expected float features of shape (N, regions, dim) or (N, dim), "
                f"got {self.images.dtype} {self.images.shape}"
            )
        self.captions = read_captions(self.root / f"{split}_caps.txt")
        n_img, n_cap = len(self.images), len(self.captions)
        # Upstream rule: one image row per caption when the counts match, else 5 captions per image.
        self.im_div = 1 if n_img == n_cap else CAPTIONS_PER_IMAGE
        if n_img == 0 or (self.im_div == CAPTIONS_PER_IMAGE and n_cap != CAPTIONS_PER_IMAGE * n_img):
            raise DataError(
                f"{self.root / f'{split}_caps.txt'}: {n_cap} captions for {n_img} images; "
                f"expected exactly {CAPTIONS_PER_IMAGE} lines per image"
            )
        for k, caption in enumerate(self.captions):
            if not caption:
                raise DataError(f"{self.root / f'{split}_caps.txt'}:{k + 1}: empty caption; every line needs text")
        if truncate_dev and split == "dev":
            self.captions = self.captions[:DEV_CAPTIONS]
        if max_images > 0:  # the captions of the first max_images images
            self.captions = self.captions[: max_images * CAPTIONS_PER_IMAGE]
        self.ids = self._read_ids()

    def _read_ids(self) -> list[int] | None:
        path = self.root / f"{self.split}_ids.txt"
        if not path.is_file():
            return None
        try:
            return [int(x) for x in path.read_text(encoding="utf-8").split()]
        except ValueError:
            raise DataError(f"{path}: expected one integer id per line") from None

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    @property
    def n_images(self) -> int:
        """Images covered by the (possibly truncated) captions."""
        return -(-self.n_captions // CAPTIONS_PER_IMAGE) if self.im_div == CAPTIONS_PER_IMAGE else self.n_captions

    @property
    def feature_dim(self) -> int:
        return self.images.shape[-1]

    def image_of(self, caption_index: int) -> int:
        return caption_index // self.im_div

    def training_images(self, rows: list[int], rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
        """Features of `rows` for training and the positions kept (all: features need no random transform)."""
        return self.images[np.asarray(rows)], list(range(len(rows)))


@dataclass
class Batch:
    """A training/evaluation batch sorted by caption length, longest first (as the originals' collate)."""

    images: torch.Tensor  # (B, R, D) or (B, D)
    captions: torch.Tensor  # (B, L) int64, 0-padded
    lengths: torch.Tensor  # (B,) int64, includes <start>/<end>
    ids: torch.Tensor  # (B,) caption indices
    image_ids: torch.Tensor  # (B,) image row of each caption
    image_lengths: torch.Tensor | None = None  # (B,) valid regions when training drops some (VSE-infinity)
    # The model's extra inputs (its method's `inputs`, e.g. GSMN's "boxes" (B, R, 4) and "depends"), by name.
    inputs: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Batch:
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.inputs.items()}
        return Batch(self.images.to(device), self.captions.to(device), self.lengths, self.ids, self.image_ids,
                     self.image_lengths, inputs)

    def extras(self, names: tuple[str, ...]) -> dict[str, Any]:
        """Named inputs of the batch: its extra inputs, or its fields (e.g. HREM's "image_ids")."""
        return {name: self.inputs[name] if name in self.inputs else getattr(self, name) for name in names}

    def __len__(self) -> int:
        return len(self.ids)


def pad_captions(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad token id lists into (B, L) int64 plus lengths (B,)."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    out = torch.zeros(len(seqs), int(lengths.max()) if len(seqs) else 0, dtype=torch.long)
    for i, seq in enumerate(seqs):
        out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out, lengths


class CaptionDataset(torch.utils.data.Dataset):
    """Item k = (image features of caption k's image, token ids of caption k, k, image row).

    `tokens` replaces the vocabulary's ids (GSMN's pre-tokenised files); `image_inputs` (per image row, e.g.
    GSMN's boxes (rows, R, 4)) and `caption_inputs` (per caption, e.g. dependency pairs) add a method's extra inputs
    to every batch.
    """

    def __init__(self, split: PrecompSplit, vocab: Vocabulary, *, caption_perm: np.ndarray | None = None,
                 tokens: list[list[int]] | None = None, image_inputs: dict[str, Any] | None = None,
                 caption_inputs: dict[str, list] | None = None) -> None:
        self.split = split
        self.tokens = tokens if tokens is not None else [vocab.encode(c) for c in split.captions]
        # Control experiment: caption k is paired with the image of caption perm[k] (breaks the pairing).
        self.caption_perm = caption_perm
        self.image_inputs, self.caption_inputs = image_inputs or {}, caption_inputs or {}

    def __len__(self) -> int:
        return self.split.n_captions

    def __getitem__(self, k: int) -> tuple[np.ndarray, list[int], int, int]:
        row = self.image_row(k)
        return self.split.images[row], self.tokens[k], k, row

    def image_row(self, k: int) -> int:
        """Feature row paired with caption k (through the control permutation, if any)."""
        return self.split.image_of(int(self.caption_perm[k]) if self.caption_perm is not None else k)

    def batch(self, indices: list[int], rng: np.random.Generator | None = None) -> Batch:
        """Read a whole batch with one fancy-indexed copy from the mapped array; with `rng` (training), raw images
        get their random transforms and pairs whose image was skipped as unreadable leave the batch."""
        rows = [self.image_row(k) for k in indices]
        if rng is None:
            feats = self.split.images[np.asarray(rows)]
        else:
            feats, kept = self.split.training_images(rows, rng)
            rows, indices = [rows[i] for i in kept], [indices[i] for i in kept]
        batch = collate([(feats[i], self.tokens[k], k, rows[i]) for i, k in enumerate(indices)])
        order = batch.ids.tolist()
        rows_in_order = np.asarray([self.image_row(k) for k in order])
        for name, values in self.image_inputs.items():
            batch.inputs[name] = torch.from_numpy(np.asarray(values[rows_in_order]))
        for name, values in self.caption_inputs.items():
            batch.inputs[name] = [values[k] for k in order]
        return batch


def collate(items: list[tuple[np.ndarray, list[int], int, int]]) -> Batch:
    """Sort by caption length (descending, stable) and stack, as the originals' collate_fn."""
    items = sorted(items, key=lambda it: len(it[1]), reverse=True)
    images = torch.from_numpy(np.stack([it[0] for it in items])).float()
    captions, lengths = pad_captions([it[1] for it in items])
    ids = torch.tensor([it[2] for it in items], dtype=torch.long)
    image_ids = torch.tensor([it[3] for it in items], dtype=torch.long)
    return Batch(images, captions, lengths, ids, image_ids)


def load_split(path: str | os.PathLike, split: str, vocab_path: str = "") -> tuple[PrecompSplit, Vocabulary]:
    """Open a split and its vocabulary from a dataset directory in either layout."""
    root = resolve_root(path, split)
    return PrecompSplit(root, split), load_vocab(find_vocab(root, vocab_path))
