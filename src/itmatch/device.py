"""Devices named by users (`train.device`, `--device`): checked once, with one line saying what is available."""

from __future__ import annotations

import re

import torch

from itmatch.errors import ConfigError

_PATTERN = re.compile(r"^(cpu|cuda|mps)(:\d+)?$")


def check_device(name: str, option: str = "--device") -> torch.device:
    """The torch device `name` ("cpu", "cuda", "cuda:1", "mps"), refused with one line when it is malformed or not
    present on this machine (`option` names where it was given, e.g. "train.device")."""
    text = str(name).strip()
    if not _PATTERN.match(text):
        raise ConfigError(f"{option}={name!r} is not a device; use cpu, cuda, cuda:N or mps")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ConfigError(f"{option}={name!r} but {why}; use {option.split('=')[0]}=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{option}={name!r} but only {torch.cuda.device_count()} GPU(s) are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{option}={name!r} but MPS is not available on this machine; use cpu")
    return device
