"""Turn a checkpoint file into a ready model (config + weights + vocabulary), checking keys strictly."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from itmatch.checkpoints import native, official
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


def load_model(path: str | os.PathLike, *, device: torch.device | str = "cpu", vocab: str = "") -> LoadedModel:
    """Load an itmatch checkpoint (model_best.pt / checkpoint.pt) or a released one, in eval mode.

    Released checkpoints carry no vocabulary: `vocab` names the file they were trained with (JSON or pickle).
    Native checkpoints always use their own vocabulary.
    """
    ckpt = native.read(path, allowed_globals=official.ALLOWED_GLOBALS)
    if not native.is_native(ckpt):
        return _load_official(ckpt, path, device=device, vocab=vocab)
    try:
        cfg = config_from_dict(ckpt["config"], f"{path} config")
        words = list(ckpt["vocab"])
        state = ckpt["model"]
    except KeyError as err:
        raise CheckpointError(f"{path}: checkpoint lacks {err}; it was not written by `itmatch train`") from None
    model = create_model(cfg.model, device=device)
    load_state_strict(model, state, str(path))
    model.eval()
    return LoadedModel(model, cfg, vocab_from_words(words), str(path))


def _load_official(ckpt: object, path: str | os.PathLike, *, device: torch.device | str, vocab: str) -> LoadedModel:
    model_cfg, state = official.convert(ckpt, str(path))
    if not vocab:
        raise CheckpointError(f"{path}: a released checkpoint carries no vocabulary; pass the one it was trained "
                              "with (--vocab FILE, e.g. the original's vocab/f30k_precomp_vocab.pkl)")
    words = load_vocab(vocab)
    if len(words) != model_cfg.vocab_size:
        raise CheckpointError(f"{path}: its word embedding has {model_cfg.vocab_size} rows but {vocab} has "
                              f"{len(words)} words; pass the vocabulary the model was trained with")
    model = create_model(model_cfg, device=device)
    load_state_strict(model, state, str(path))
    model.eval()
    return LoadedModel(model, Config(model=model_cfg), words, str(path))
