"""`itmatch presets`: list the packaged presets (and those of plugins)."""

from __future__ import annotations

import argparse


def _cmd_presets(args: argparse.Namespace) -> int:
    from itmatch.config import _preset_dir, list_presets

    for name in list_presets():
        first = (_preset_dir() / f"{name}.toml").read_text(encoding="utf-8").splitlines()[0]
        print(f"{name:32s} {first.lstrip('# ').strip()}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """The `presets` command."""
    pr = sub.add_parser("presets", help="list the packaged presets")
    pr.set_defaults(run=_cmd_presets)
