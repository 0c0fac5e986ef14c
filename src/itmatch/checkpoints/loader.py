"""Turn a checkpoint file into a ready model (config + weights + tokenizer), checking keys strictly.

A file is either itmatch's own (native) or a release of an original repository, recognised by the first of the
registered methods' importers (`MethodSpec.importers`, in priority order) whose `detect` accepts it and imported by
its pure `convert(ckpt) -> (model config, state dict)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from itmatch.checkpoints import native
from itmatch.config import Config, DataConfig, config_from_dict, strict
from itmatch.data.precomp import CHECKPOINT_VOCAB_HINT, find_vocab
from itmatch.data.tokenize import CaptionTokenizer
from itmatch.data.vocab import Vocabulary, load_vocab
from itmatch.device import check_device
from itmatch.errors import CheckpointError, ConfigError, DataError
from itmatch.method import Importer, MethodSpec
from itmatch.models.base import RetrievalModel
from itmatch.registry import METHODS, create_model, list_models, method_spec

OFFICIAL_GLOBALS: tuple[type, ...] = (argparse.Namespace,)  # the classes the originals' pickles may hold


def importers() -> list[tuple[MethodSpec, Importer]]:
    """Every registered method's importers of original checkpoints, most specific (lowest priority) first."""
    list_models()
    found = [(spec, imp) for spec in METHODS.values() for imp in spec.importers]
    return sorted(found, key=lambda pair: (pair[1].priority, pair[0].name))


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


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def load_model(path: str | os.PathLike, *, device: torch.device | str = "cpu", vocab: str = "",
               bert_path: str = "", data_root: Path | None = None,
               memory_budget_mb: float | None = None) -> LoadedModel:
    """Load an itmatch checkpoint (model_best.pt / checkpoint.pt) or an original release, in eval mode.

    `vocab` (a vocabulary JSON) is needed by released word-vocabulary models (default: the one found next to
    `data_root`, as `itmatch train` finds it), `bert_path` by released BERT models (config + tokenizer; the
    weights come from the checkpoint); `bert_path` also relocates a native BERT model. `memory_budget_mb` sets the
    scoring tiles' memory of methods that have one (speed only).
    """
    check_device(str(device))
    ckpt = native.read(path, allow=OFFICIAL_GLOBALS)
    if native.is_native(ckpt):
        try:
            cfg = config_from_dict(ckpt["config"], f"{path} config")
            words = list(ckpt["vocab"])
            state = ckpt["model"]
        except KeyError as err:
            raise CheckpointError(f"{path}: checkpoint lacks {err}; it was not written by `itmatch train`") from None
        spec = method_spec(cfg.model.name)
        if vocab:
            raise CheckpointError(f"{path} is an itmatch checkpoint, which carries its own vocabulary; --vocab is for "
                                  "the originals' releases (leave it out)")
        cfg = dataclasses.replace(cfg, model=spec.relocate(cfg.model, bert_path=bert_path))
        tokenizer = spec.tokenizer(cfg.model, vocab_from_words(words) if words else None)
    else:
        found = next(((spec, imp) for spec, imp in importers() if imp.detect(ckpt)), None)
        if found is None:
            names = sorted({spec.name for spec, _ in importers()})
            raise CheckpointError(
                f"{path}: neither an itmatch checkpoint nor a release of a supported original repository "
                f"({', '.join(names)})"
            )
        spec, importer = found
        name = spec.name
        try:
            model_cfg, state = importer.convert(ckpt)
            # the release's options, checked as a preset's would be (types and ranges)
            model_cfg = strict(spec.config, {k: _plain(v) for k, v in dataclasses.asdict(model_cfg).items()},
                               "options")
        except CheckpointError:
            raise
        except (ConfigError, ValueError, TypeError, KeyError, AttributeError, IndexError) as err:
            raise CheckpointError(f"{path}: not a usable {name} release ({str(err).splitlines()[0][:200]})") from None
        model_cfg = spec.relocate(model_cfg, bert_path=bert_path)
        provider = spec.inputs(model_cfg)
        pretokenized = provider is not None and provider.pretokenized  # GSMN: ids from precaps_stan.txt
        uses_vocab = spec.uses_vocab(model_cfg)
        if uses_vocab and not vocab and data_root is not None and not pretokenized:
            vocab = str(find_vocab(data_root, hint=CHECKPOINT_VOCAB_HINT))
        if not uses_vocab and not bert_path:
            raise CheckpointError(f"{path}: a {name} BERT model needs --bert-path DIR (BERT config and vocab.txt)")
        if uses_vocab and not vocab and not pretokenized:
            raise CheckpointError(f"{path}: a {name} word-vocabulary model needs --vocab PATH (.json or .pkl)")
        if pretokenized and not vocab:
            tokenizer: CaptionTokenizer = PretokenizedOnly(model_cfg.vocab_size)
        else:
            tokenizer = spec.tokenizer(model_cfg, load_vocab(vocab) if vocab else None)
        if uses_vocab and len(tokenizer) != model_cfg.vocab_size:
            raise CheckpointError(
                f"{path}: vocabulary {vocab} gives {len(tokenizer)} ids but the checkpoint embeds "
                f"{model_cfg.vocab_size} words; pass the vocabulary the model was trained with"
            )
        data = DataConfig(**(importer.data(ckpt, model_cfg) if importer.data is not None else {}))
        cfg = Config(model=model_cfg, data=data)
    model_cfg = spec.for_loading(cfg.model)
    if memory_budget_mb is not None:
        model_cfg = spec.with_memory_budget(model_cfg, memory_budget_mb)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    broken = next((k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()
                   and not torch.isfinite(v).all()), None)
    if broken is not None:
        raise CheckpointError(f"{path}: weight {broken} holds NaN or infinity (a diverged run?); use an earlier "
                              "checkpoint")
    model = create_model(cfg.model, device=device)
    load_state_strict(model, state, str(path))
    model.eval()
    opt = None if native.is_native(ckpt) else ckpt.get("opt")
    batch = getattr(opt, "batch_size", None)
    return LoadedModel(model, cfg, tokenizer, str(path), int(batch) if isinstance(batch, int) else None)
