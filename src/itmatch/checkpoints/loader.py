"""Turn a checkpoint file into a ready model (config + weights + vocabulary), checking keys strictly."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from itmatch.checkpoints import native
from itmatch.checkpoints.official import detect_method, is_official, read_official
from itmatch.config import Config, config_from_dict
from itmatch.data.vocab import Vocabulary, load_vocab
from itmatch.errors import CheckpointError
from itmatch.models.base import RetrievalModel
from itmatch.registry import create_model


@dataclass
class LoadedModel:
    model: RetrievalModel
    config: Config
    vocab: Vocabulary
    path: str


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


def _load_official(ckpt: dict, path: str, vocab_path: str | None, data_root: Path | None,
                   device: torch.device | str) -> LoadedModel:
    from itmatch.checkpoints import scan
    from itmatch.config import DataConfig, TrainConfig
    from itmatch.data.precomp import find_vocab

    converters = {"scan": scan.convert}
    method = detect_method(ckpt["opt"])
    cfg_model, state = converters[method](ckpt, path)
    if vocab_path is None and data_root is None:
        raise CheckpointError(f"{path}: an original checkpoint holds no vocabulary; pass --vocab VOCAB.json")
    vocab_file = find_vocab(data_root, vocab_path or "") if data_root is not None else Path(vocab_path or "")
    vocab = load_vocab(vocab_file)
    if len(vocab) != cfg_model.vocab_size:
        raise CheckpointError(
            f"{path}: the checkpoint's embedding has {cfg_model.vocab_size} words but {vocab_file} has "
            f"{len(vocab)}; use the vocabulary released with the checkpoint"
        )
    model = create_model(cfg_model, device=device)
    load_state_strict(model, state, path)
    model.eval()
    opt = ckpt["opt"]
    train = TrainConfig(margin=float(getattr(opt, "margin", 0.2)),
                        max_violation=bool(getattr(opt, "max_violation", False)))
    cfg = Config(model=cfg_model, data=DataConfig(path=str(data_root or "")), train=train)
    return LoadedModel(model, cfg, vocab, path)


def load_model(path: str | os.PathLike, *, device: torch.device | str = "cpu", vocab_path: str | None = None,
               data_root: Path | None = None) -> LoadedModel:
    """Load an itmatch checkpoint, or an original repository's released file, in eval mode.

    Original files carry no vocabulary: it comes from `vocab_path` or is looked up next to `data_root`.
    """
    path = str(path)
    ckpt = read_official(path)
    if ckpt.get("format") != native.FORMAT:
        if is_official(ckpt):
            return _load_official(ckpt, path, vocab_path, data_root, device)
        raise CheckpointError(f"{path}: not a readable itmatch checkpoint, nor a recognised original checkpoint")
    try:
        cfg = config_from_dict(ckpt["config"], f"{path} config")
        words = list(ckpt["vocab"])
        state = ckpt["model"]
    except KeyError as err:
        raise CheckpointError(f"{path}: checkpoint lacks {err}; it was not written by `itmatch train`") from None
    model = create_model(cfg.model, device=device)
    load_state_strict(model, state, path)
    model.eval()
    return LoadedModel(model, cfg, vocab_from_words(words), path)
