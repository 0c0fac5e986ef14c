"""Run configuration: frozen dataclasses, presets as TOML data files, strict keys, `--set` overrides.

A preset has three tables, `[model]` (with `name` choosing the method), `[data]` and `[train]`. Unknown keys and
ill-typed values are errors that name the key and the file; the resolved configuration is saved with every run.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import tomllib

from itmatch.errors import ConfigError


def bounded(default: Any, *, gt: float | None = None, ge: float | None = None, le: float | None = None,
            lt: float | None = None) -> Any:
    """A config field with a range, checked whenever a config is built (`strict`); floats are always finite."""
    limits = {k: v for k, v in (("gt", gt), ("ge", ge), ("le", le), ("lt", lt)) if v is not None}
    return field(default=default, metadata={"range": limits})


def positive(default: Any) -> Any:
    """A field that must be > 0 (sizes, counts, rates)."""
    return bounded(default, gt=0)


def non_negative(default: Any) -> Any:
    """A field that must be >= 0 (0 usually meaning off)."""
    return bounded(default, ge=0)


_RANGE_WORDS = {"gt": "> {}", "ge": ">= {}", "le": "<= {}", "lt": "< {}"}


def check_range(value: Any, limits: dict[str, float], where: str) -> None:
    """One line naming the key, the value and the allowed range when `value` is outside it (or not finite)."""
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{where}: {item!r} is not a finite number")
        if not isinstance(item, int | float) or isinstance(item, bool):
            continue
        ok = all({"gt": item > bound, "ge": item >= bound, "le": item <= bound, "lt": item < bound}[op]
                 for op, bound in limits.items())
        if not ok:
            allowed = " and ".join(_RANGE_WORDS[op].format(bound) for op, bound in limits.items())
            raise ConfigError(f"{where}: {item!r} is out of range; it must be {allowed}")


@dataclass(frozen=True, slots=True)
class DataConfig:
    path: str = ""  # directory with {split}_ims.npy (SCAN) or its parent with precomp/ (VSE-infinity)
    vocab: str = ""  # vocab JSON; "" = look next to the data (vocab.json, ../vocab/{name}_vocab.json)
    train_split: str = "train"
    val_split: str = "dev"
    test_split: str = "test"
    batch_size: int = positive(128)
    workers: int = non_negative(0)  # the originals never pass num_workers to the precomp loader
    prefetch: int = bounded(4, ge=1, le=64)  # batches each worker reads ahead (memory-mapped features on a slow disk)
    shuffle_captions: bool = False  # control experiment: pair training captions with random images
    train_images: int = non_negative(0)  # train on the first N images of the train split only (0 = all); quick runs
    source: Literal["features", "images"] = "features"  # images: raw images via id_mapping.json (grid/CNN models)
    image_dir: str = ""  # raw images: directory of the id_mapping.json paths ("" = DATA/flickr30k-images, images)
    input_scale_factor: float = positive(1.0)  # raw images: side int(256 * this) (VSE-inf. grid scripts: 2.0 -> 512)
    skip_bad_images: bool = False  # raw images: drop pairs with unreadable images from training batches


@dataclass(frozen=True, slots=True)
class TrainConfig:
    epochs: int = positive(30)
    lr: float = positive(2e-4)
    lr_update: int = non_negative(15)  # lr = lr0 * 0.1 ** (epoch // lr_update), set at the start of each epoch
    lr_milestones: tuple[int, ...] = non_negative(())  # if given, lr x0.1 at each of these epochs (HREM: 15, 25)
    grad_clip: float = 2.0  # total-norm clip; <= 0 disables
    margin: float = non_negative(0.2)
    max_violation: bool = True  # VSE++ hardest negative; False = VSE0 sum of violations
    seed: int = 0
    val_every: int = non_negative(0)  # extra dev evaluations every N steps (logged unless val_selects); 0 = epoch ends
    val_selects: bool = False  # the val_every evaluations also select model_best (VSRN's train.py does)
    save_every: int = non_negative(0)  # resumable checkpoint every N steps; 0 = epoch ends only
    log_every: int = positive(10)
    max_steps: int = non_negative(0)  # stop after this many steps in total (0 = no limit); for smoke runs
    region_drop: float = bounded(0.0, ge=0, lt=1)  # training: drop each region with this probability (VSE-inf.: 0.2)
    # training: select words with this probability to mask/replace/delete (VSE-infinity: 0.2)
    word_noise: float = bounded(0.0, ge=0, le=1)
    device: str = "cpu"  # under torchrun, "cuda" gives each rank the GPU of its LOCAL_RANK
    amp: Literal["", "bf16", "fp16"] = ""  # autocast mixed precision ("" = float32); fp16 (with loss scaling) on GPU
    # Hardest-negative collapse (itmatch.collapse): warn = log the signal and the fix; fallback = also switch to
    # VSE0 for an epoch and retry hardest negatives; off = watch nothing.
    collapse_guard: Literal["warn", "fallback", "off"] = "warn"
    collapse_patience: int = 20  # consecutive collapsed batches before the guard acts


@dataclass(frozen=True, slots=True)
class Config:
    model: Any
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check `value` against a simple field type (bool, int, float, str, Literal, tuple)."""
    origin = typing.get_origin(typ)
    if origin is typing.Literal:
        if value not in typing.get_args(typ):
            allowed = ", ".join(repr(a) for a in typing.get_args(typ))
            raise ConfigError(f"{where}: {value!r} is not one of {allowed}")
        return value
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(typ):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not fit type {typ}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(typ) or (Any,)
        return tuple(_coerce(v, inner, where) for v in value)
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if typ is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected nothing, got {value!r}")
        return value
    return value


def strict(cls: type, table: dict[str, Any], where: str) -> Any:
    """Build dataclass `cls` from `table`, refusing unknown keys and ill-typed values."""
    hints = _field_types(cls)
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    values = {k: _coerce(v, hints[k], f"{where}: key {k!r}") for k, v in table.items()}
    for f in dataclasses.fields(cls):
        value = values.get(f.name, f.default)
        if value is not dataclasses.MISSING:
            check_range(value, f.metadata.get("range", {}), f"{where}: key {f.name!r}")
    return cls(**values)


def config_from_dict(raw: dict[str, Any], where: str = "config") -> Config:
    """Resolve a nested dict (as in a preset or a checkpoint) into a `Config`."""
    from itmatch.registry import method_spec

    unknown = sorted(set(raw) - {"model", "data", "train"})
    if unknown:
        raise ConfigError(f"{where}: unknown table [{unknown[0]}]; allowed: [model], [data], [train]")
    model_table = dict(raw.get("model", {}))
    name = model_table.get("name")
    if not name:
        raise ConfigError(f"{where}: [model] needs a 'name' (one of the registered methods)")
    model = strict(method_spec(name).config, model_table, f"{where} [model]")
    data = strict(DataConfig, dict(raw.get("data", {})), f"{where} [data]")
    train = strict(TrainConfig, dict(raw.get("train", {})), f"{where} [train]")
    return Config(model=model, data=data, train=train)


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dict of the resolved configuration (safe to store in a weights-only checkpoint)."""

    def plain(obj: Any) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    return {"model": plain(cfg.model), "data": plain(cfg.data), "train": plain(cfg.train)}


def _preset_dir() -> Any:
    return resources.files("itmatch") / "presets"


def _method_presets() -> dict[str, Any]:
    """Presets declared by registered methods (plugins), by name."""
    from itmatch.registry import METHODS, list_models

    list_models()  # built-ins and entry-point plugins registered
    return {name: preset for spec in METHODS.values() for name, preset in spec.presets.items()}


def list_presets() -> list[str]:
    packaged = {p.name.removesuffix(".toml") for p in _preset_dir().iterdir() if p.name.endswith(".toml")}
    return sorted(packaged | set(_method_presets()))


def _read_toml(name_or_path: str) -> tuple[dict[str, Any], str]:
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.is_file():
        text, where = path.read_text(encoding="utf-8"), str(path)
    else:
        entry = _preset_dir() / f"{name_or_path}.toml"
        declared = _method_presets().get(name_or_path)
        if not entry.is_file() and declared is not None:
            return {k: dict(v) for k, v in declared.items()}, f"preset {name_or_path}"
        if not entry.is_file():
            raise ConfigError(
                f"unknown preset {name_or_path!r}; run `itmatch presets` to list them, or pass a .toml file"
            )
        text, where = entry.read_text(encoding="utf-8"), f"presets/{name_or_path}.toml"
    try:
        return tomllib.loads(text), where
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{where}: invalid TOML ({err})") from None


def parse_override(item: str) -> tuple[str, str, Any]:
    """Split `section.key=value`; the value is read as a TOML scalar, falling back to a bare string."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"bad override {item!r}; expected section.key=value, e.g. train.lr=2e-4")
    dotted, text = item.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return section, key, value


def load_preset(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a packaged preset (by name) or a TOML file, then apply `section.key=value` overrides."""
    raw, where = _read_toml(name_or_path)
    for item in overrides:
        section, key, value = parse_override(item)
        if section not in ("model", "data", "train"):
            raise ConfigError(f"override {item!r}: unknown section {section!r}; use model., data. or train.")
        raw.setdefault(section, {})[key] = value
    return config_from_dict(raw, where)
