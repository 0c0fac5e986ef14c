"""The one registry: model name -> (config class, builder)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from itmatch.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ModelEntry:
    config_cls: type
    build: Callable[..., Any]


MODELS: dict[str, ModelEntry] = {}  # the only module-level mutable


def register_model(name: str, config_cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `build(cfg, *, device=None, dtype=None)` under `name`; duplicates are a programming error."""

    def add(build: Callable[..., Any]) -> Callable[..., Any]:
        if name in MODELS:
            raise RuntimeError(f"model {name!r} registered twice (by {build.__module__})")
        MODELS[name] = ModelEntry(config_cls, build)
        return build

    return add


def _ensure_loaded() -> None:
    import itmatch.models  # noqa: F401  (registers every method)


def list_models() -> list[str]:
    _ensure_loaded()
    return sorted(MODELS)


def model_entry(name: str) -> ModelEntry:
    _ensure_loaded()
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def create_model(cfg: Any, *, device: Any = None, dtype: Any = None) -> Any:
    """Build the model named by `cfg.name` from its frozen config dataclass."""
    return model_entry(cfg.name).build(cfg, device=device, dtype=dtype)
