"""The one registry: method name -> `MethodSpec`. Built-in methods register on import of `itmatch.models`;
plugins through the entry-point group `itmatch.methods` or a Python file (`load_plugin`, `itmatch --plugin FILE`)."""

from __future__ import annotations

import importlib.util
import logging
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from itmatch.errors import ConfigError
from itmatch.method import MethodSpec

_logger = logging.getLogger(__name__)

METHODS: dict[str, MethodSpec] = {}  # the only module-level mutable
ENTRY_POINT_GROUP = "itmatch.methods"
_loaded = {"builtins": False, "entry_points": False}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Register a method; a second method of the same name is a programming error."""
    if spec.name in METHODS and METHODS[spec.name] is not spec:
        raise ConfigError(f"method {spec.name!r} is registered twice ({METHODS[spec.name].build.__module__} and "
                          f"{spec.build.__module__}); rename one of them")
    METHODS[spec.name] = spec
    return spec


def _ensure_loaded() -> None:
    if not _loaded["builtins"]:
        _loaded["builtins"] = True
        import itmatch.models  # noqa: F401  (registers every built-in method)
    if not _loaded["entry_points"]:
        _loaded["entry_points"] = True
        for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                spec = entry.load()
            except Exception as err:  # a broken plugin must not break the library: one line, then go on
                _logger.warning("plugin %s (%s) failed to load: %s", entry.name, entry.value, err)
                continue
            if isinstance(spec, MethodSpec):
                register_method(spec)


def load_plugin(path: str | Path) -> list[str]:
    """Import a method defined in one Python file (it calls `register_method`); returns the names it added."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".py":
        raise ConfigError(f"plugin not found: {path} (pass the .py file that defines the method)")
    _ensure_loaded()
    before = set(METHODS)
    name = f"itmatch_plugin_{path.stem}_{abs(hash(str(path.resolve())))}"
    if name not in sys.modules:
        module_spec = importlib.util.spec_from_file_location(name, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[name]
            raise ConfigError(f"plugin {path} failed to load: {type(err).__name__}: {err}") from None
    added = sorted(set(METHODS) - before)
    return added


def list_models() -> list[str]:
    """Names of the registered methods."""
    _ensure_loaded()
    return sorted(METHODS)


def method_spec(name: str) -> MethodSpec:
    """The spec of a registered method; an unknown name is one line listing the known ones."""
    _ensure_loaded()
    if name not in METHODS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(sorted(METHODS))} (a plugin's method "
                          "needs --plugin FILE.py or an installed package that declares it)")
    return METHODS[name]


def create_model(cfg: Any, *, device: Any = None, dtype: Any = None) -> Any:
    """Build the model named by `cfg.name` from its frozen config dataclass."""
    return method_spec(cfg.name).build(cfg, device=device, dtype=dtype)
