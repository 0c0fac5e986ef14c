"""Turn a checkpoint file into a ready model (config + weights + tokenizer), checking keys strictly.

A file is either itmatch's own (native) or a release of an original repository, recognised by the first entry of
`OFFICIAL` whose `detect` accepts it and imported by its pure `convert(ckpt) -> (model config, state dict)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from itmatch.checkpoints import gsmn, hrem, native, scan, vse_infinity, vsepp, vsrn
from itmatch.config import Config, DataConfig, config_from_dict
from itmatch.data.gsmn_files import reads_precaps
from itmatch.data.precomp import CHECKPOINT_VOCAB_HINT, find_vocab
from itmatch.data.tokenizers import CaptionTokenizer, text_tokenizer, uses_vocab
from itmatch.data.vocab import Vocabulary, load_vocab
from itmatch.errors import CheckpointError, DataError
from itmatch.models.base import RetrievalModel
from itmatch.registry import create_model

# (name, detect, convert) per original repository; the classes their pickles may hold (argparse options).
OFFICIAL: list[tuple[str, Callable[[Any], bool], Callable[[Any], tuple[Any, dict[str, torch.Tensor]]]]] = [
    ("vse_infinity", vse_infinity.detect, vse_infinity.convert),
    ("scan", scan.detect, scan.convert),
    ("vsrn", vsrn.detect, vsrn.convert),
    ("hrem", hrem.detect, hrem.convert),
    ("gsmn", gsmn.detect, gsmn.convert),
    ("vsepp", vsepp.detect, vsepp.convert),  # last: SCAN/VSRN/HREM files share its layout, with more in them
]
OFFICIAL_GLOBALS: tuple[type, ...] = (argparse.Namespace,)


@dataclass
class LoadedModel:
    model: RetrievalModel
    config: Config
    vocab: CaptionTokenizer
    path: str
    original_batch_size: int | None = None  # a release's opt.batch_size: the batch its original evaluated with


class PretokenizedOnly:
    """Tokenizer of a released model that reads pre-tokenised ids (GSMN's precaps_stan.txt): it only knows its
    vocabulary size, taken from the checkpoint's embedding."""

    def __init__(self, size: int) -> None:
        self.size = size

    def encode(self, caption: str) -> list[int]:
        raise DataError("this model reads word ids from {split}_precaps_stan.txt; pass --vocab to encode raw text")

    def __len__(self) -> int:
        return self.size


def vocab_from_words(words: list[str]) -> Vocabulary:
    vocab = Vocabulary()
    for word in words:
        vocab.add_word(word)
    return vocab


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict(strict=True) with a one-line message listing missing/unexpected/mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(state))
              if tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if shapes:
        problems.append(f"shape mismatch {shapes[:3]}")
    if problems:
        raise CheckpointError(f"{where}: weights do not fit the model ({'; '.join(problems)})")
    model.load_state_dict(state, strict=True)


def _with_bert_path(model_cfg: Any, bert_path: str) -> Any:
    if bert_path and "bert_path" in {f.name for f in dataclasses.fields(model_cfg)}:
        return dataclasses.replace(model_cfg, bert_path=bert_path)
    return model_cfg


def load_model(path: str | os.PathLike, *, device: torch.device | str = "cpu", vocab: str = "",
               bert_path: str = "", data_root: Path | None = None) -> LoadedModel:
    """Load an itmatch checkpoint (model_best.pt / checkpoint.pt) or an original release, in eval mode.

    `vocab` (a vocabulary JSON) is needed by released word-vocabulary models (default: the one found next to
    `data_root`, as `itmatch train` finds it), `bert_path` by released BERT models (config + tokenizer; the
    weights come from the checkpoint); `bert_path` also relocates a native BERT model.
    """
    ckpt = native.read(path, allow=OFFICIAL_GLOBALS)
    if native.is_native(ckpt):
        try:
            cfg = config_from_dict(ckpt["config"], f"{path} config")
            words = list(ckpt["vocab"])
            state = ckpt["model"]
        except KeyError as err:
            raise CheckpointError(f"{path}: checkpoint lacks {err}; it was not written by `itmatch train`") from None
        cfg = dataclasses.replace(cfg, model=_with_bert_path(cfg.model, bert_path))
        tokenizer = text_tokenizer(cfg.model, vocab_from_words(words) if words else None)
    else:
        name, convert = next(((n, c) for n, d, c in OFFICIAL if d(ckpt)), (None, None))
        if convert is None:
            raise CheckpointError(
                f"{path}: neither an itmatch checkpoint nor a release of a supported original repository "
                f"({', '.join(n for n, _, _ in OFFICIAL)})"
            )
        model_cfg, state = convert(ckpt)
        model_cfg = _with_bert_path(model_cfg, bert_path)
        pretokenized = reads_precaps(model_cfg)  # GSMN: ids from precaps_stan.txt
        if uses_vocab(model_cfg) and not vocab and data_root is not None and not pretokenized:
            vocab = str(find_vocab(data_root, hint=CHECKPOINT_VOCAB_HINT))
        if not uses_vocab(model_cfg) and not getattr(model_cfg, "bert_path", ""):
            raise CheckpointError(f"{path}: a {name} BERT model needs --bert-path DIR (BERT config and vocab.txt)")
        if uses_vocab(model_cfg) and not vocab and not pretokenized:
            raise CheckpointError(f"{path}: a {name} word-vocabulary model needs --vocab PATH (.json or .pkl)")
        if pretokenized and not vocab:
            tokenizer: CaptionTokenizer = PretokenizedOnly(model_cfg.vocab_size)
        else:
            tokenizer = text_tokenizer(model_cfg, load_vocab(vocab) if vocab else None)
        if uses_vocab(model_cfg) and len(tokenizer) != model_cfg.vocab_size:
            raise CheckpointError(
                f"{path}: vocabulary {vocab} gives {len(tokenizer)} ids but the checkpoint embeds "
                f"{model_cfg.vocab_size} words; pass the vocabulary the model was trained with"
            )
        data = DataConfig()
        if getattr(model_cfg, "backbone", ""):  # a grid model reads raw images at the size it was trained on
            opt = ckpt.get("opt")
            data = DataConfig(source="images", input_scale_factor=float(getattr(opt, "input_scale_factor", 1.0)))
        cfg = Config(model=model_cfg, data=data)
    if getattr(cfg.model, "backbone_weights", ""):  # initial CNN weights: the checkpoint's replace them
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone_weights=""))
    model = create_model(cfg.model, device=device)
    load_state_strict(model, state, str(path))
    model.eval()
    opt = None if native.is_native(ckpt) else ckpt.get("opt")
    batch = getattr(opt, "batch_size", None)
    return LoadedModel(model, cfg, tokenizer, str(path), int(batch) if isinstance(batch, int) else None)
