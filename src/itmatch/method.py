"""What a method declares, in one place, for the rest of the library: the method spec.

A method is one module (`itmatch/models/<name>.py`, or a plugin's own file) that ends with

    SPEC = register_method(MethodSpec(name="my_method", config=MyConfig, build=build, recipe=MyRecipe, ...))

Training, evaluation, checkpoint loading, search, serving and the CLI read the spec and never branch on a method's
name or on its config fields. The spec says:

* how to build the model (`config`, `build`) and which config fields only move it or tune its speed (`neutral_keys`);
* what it reads besides features and word ids (`inputs`: per-image and per-caption inputs for a dataset split and
  for a free query, e.g. GSMN's boxes and dependency pairs);
* how it tokenises captions (`tokenizer`), whether it reads pixels (`pixels`), how a local path is relocated
  (`relocate`);
* how the originals' released checkpoints map onto it (`importers`);
* how it trains (`recipe`: loss, negative schedule and warm-ups, optimizer groups, selection criterion, training-only
  modules), kept apart from the `nn.Module`;
* optional capabilities (`attention`: word-region attention for the web page).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from itmatch.errors import ConfigError

if TYPE_CHECKING:
    from itmatch.models.base import RetrievalModel
    from itmatch.recipe import Recipe


@dataclass(frozen=True)
class Importer:
    """A released checkpoint of an original repository: `detect(ckpt)` recognises the loaded dict, `convert(ckpt)`
    returns (model config, state dict for a strict load). `data` (optional) gives the data settings the release
    implies (a grid model's image size), as a dict of `DataConfig` fields. Importers are tried in `priority` order
    (lower first), so a more specific layout is recognised before a general one."""

    detect: Callable[[Any], bool]
    convert: Callable[[Any], tuple[Any, dict[str, torch.Tensor]]]
    priority: int = 50
    data: Callable[[Any, Any], dict[str, Any]] | None = None


@dataclass
class SplitInputs:
    """A method's extra inputs for a dataset split: per image row (`images[name]`, indexable by row), per caption
    (`captions[name]`, a list), and the caption word ids when the method does not tokenise the captions itself
    (`token_ids`, e.g. GSMN's released models read `{split}_precaps_stan.txt`)."""

    images: dict[str, Any] = field(default_factory=dict)
    captions: dict[str, list] = field(default_factory=dict)
    token_ids: list[list[int]] | None = None


class Inputs(Protocol):
    """What a model's encoders read besides features and word ids, and how to get it.

    `image` / `caption` name the keyword arguments `encode_image` / `encode_text` take (GSMN: "boxes";
    sparse GSMN: "depends"). `pretokenized`: captions are read as word ids from the dataset, so free text
    cannot be encoded."""

    image: tuple[str, ...]
    caption: tuple[str, ...]
    pretokenized: bool

    def for_split(self, split: Any, *, rows: Sequence[int] | None = None,
                  options: Mapping[str, Any] | None = None, captions: bool = True) -> SplitInputs: ...

    def for_texts(self, texts: Sequence[str], parser: Any = None) -> dict[str, list]: ...

    def for_captions(self, root: Any, split: str, texts: Sequence[str]) -> SplitInputs: ...

    def for_image_query(self, features: np.ndarray, given: Mapping[str, Any]) -> dict[str, Any]: ...

    def load_parser(self) -> Any: ...


def _no_pixels(model_cfg: Any) -> str | None:
    return None


def _same(model_cfg: Any, **paths: str) -> Any:
    return model_cfg


def complete_sizes(model_cfg: Any, *, image_dim: int | None, vocab_size: int | None) -> Any:
    """The config with the data-dependent sizes filled in: `image_dim` (feature size; None for pixel inputs) and
    `vocab_size` (tokenizer size), for the configs that declare such fields (the default of `MethodSpec.complete`)."""
    fields = {f.name for f in dataclasses.fields(model_cfg)}
    updates: dict[str, Any] = {}
    if "vocab_size" in fields and vocab_size is not None:
        updates["vocab_size"] = vocab_size
    if "image_dim" in fields and image_dim is not None:
        current = model_cfg.image_dim
        if current not in (0, image_dim):
            raise ConfigError(f"model.image_dim={current} but the data has {image_dim}-d features")
        updates["image_dim"] = image_dim
    return dataclasses.replace(model_cfg, **updates)


def feature_dim(model_cfg: Any) -> int | None:
    """The feature size a config reads (its `image_dim` field when it has one and it is set), the default of
    `MethodSpec.feature_dim`."""
    if "image_dim" not in {f.name for f in dataclasses.fields(model_cfg)}:
        return None
    return model_cfg.image_dim or None


def vocabulary_tokenizer(model_cfg: Any, vocab: Any, extra_tokens: Sequence[str] = ()) -> Any:
    """The dataset's word vocabulary as the tokenizer, extended by the tokens a method appends (`extra_tokens`,
    e.g. VSE-infinity's <mask>); the default of `MethodSpec.tokenizer`."""
    from itmatch.data.tokenize import extended_vocabulary

    if vocab is None:
        raise ConfigError(f"model {model_cfg.name!r} needs a word vocabulary (pass --vocab or --set data.vocab=PATH)")
    return extended_vocabulary(vocab, tuple(extra_tokens))


@dataclass(frozen=True)
class MethodSpec:
    """Everything the library needs to know about one method (see the module docstring)."""

    name: str
    config: type
    build: Callable[..., RetrievalModel]
    recipe: Callable[..., Recipe] | None = None  # (model, config: Config, gather) -> Recipe; None = the default
    inputs: Callable[[Any], Inputs | None] = lambda model_cfg: None
    importers: tuple[Importer, ...] = ()
    # Tokenizer for a config: (model config, word vocabulary or None) -> CaptionTokenizer. `uses_vocab` says
    # whether it needs the dataset's word vocabulary (False: it brings its own, e.g. BERT's wordpieces).
    tokenizer: Callable[[Any, Any], Any] = vocabulary_tokenizer
    uses_vocab: Callable[[Any], bool] = lambda model_cfg: True
    # Raw images: the pixel normalisation ("imagenet", "detector") when the config reads pixels, else None.
    pixels: Callable[[Any], str | None] = _no_pixels
    # Relocates a config's local directories (`bert_path=...`), e.g. to load a checkpoint on another machine.
    relocate: Callable[..., Any] = _same
    # The config to build when loading weights from a checkpoint (e.g. without initial backbone weights).
    for_loading: Callable[[Any], Any] = lambda model_cfg: model_cfg
    complete: Callable[..., Any] = complete_sizes
    feature_dim: Callable[[Any], int | None] = feature_dim
    # Config keys that move the model or tune its speed without changing a score (index staleness ignores them),
    # and the one that sets its memory budget for scoring tiles (`itmatch eval --memory-budget`), if any.
    neutral_keys: frozenset[str] = frozenset()
    memory_budget_key: str | None = None
    eval_dtype: torch.dtype = torch.float64  # what its original scored in (float64 numpy for most)
    eval_options: frozenset[str] = frozenset()  # extra evaluation options it accepts (GSMN: "box_compat", ...)
    # Word -> region attention for the web page: (model, image features (1, R, D), token ids (1, L)) ->
    # {"direction": str, "weights": (L, R) array}; None = not offered.
    attention: Callable[..., dict[str, Any]] | None = None
    # Why torchrun training would not equal one process on the global batch for this config (None: it does).
    ddp_refusal: Callable[[Any], str | None] = lambda model_cfg: None
    region_drop: bool = False  # whether `encode_image(images, lengths)` takes per-image region counts
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # extra presets (plugins)

    def with_memory_budget(self, model_cfg: Any, megabytes: float) -> Any:
        if self.memory_budget_key is None:
            return model_cfg
        return dataclasses.replace(model_cfg, **{self.memory_budget_key: megabytes})
