"""What every command shares: the one-line-error parser, progress-bar policy and the model-loading options."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from itmatch.errors import ItmatchError


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one `ItmatchError` line (no usage dump)."""

    def error(self, message: str) -> None:
        raise ItmatchError(f"{message} (see `{self.prog} --help`)")


def progress(args: argparse.Namespace) -> bool:
    """Progress bars only on a terminal and without --quiet."""
    return not args.quiet and sys.stderr.isatty()


def epoch_lines(args: argparse.Namespace) -> Any:
    """Where no progress bar can be drawn (stderr not a terminal: a CI log, nohup), one plain line per epoch."""
    if args.quiet or sys.stderr.isatty():
        return None

    def line(state: Any, info: dict) -> None:
        print(f"epoch {info['epoch']}/{info['epochs']}: dev rsum {info['rsum']:.1f}{' (best)' if info['best'] else ''}"
              f", mean loss {info['loss']:.3f}{', hardest negatives' if info['hardest_negatives'] else ''}, "
              f"{info['seconds']:.0f}s of training", file=sys.stderr, flush=True)

    return line


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--device, --vocab and --bert-path: where a checkpoint runs and what a released one needs besides weights."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", help="vocabulary (.json, or the original's .pkl) of an original checkpoint "
                        "(default: found next to --data)")
    parser.add_argument("--bert-path", help="BERT directory (config + vocab.txt) of an original BERT checkpoint")


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (batch sizes, chunk sizes, k, limits)."""
    return _integer(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (worker counts, queue lengths, seeds)."""
    return _integer(text, 0)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (memory budgets, scale factors)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be a finite number > 0")
    return value


def port(text: str) -> int:
    """argparse type: a TCP port, 1..65535."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (1..65535)")
    return value


def refuse_existing(path: str | os.PathLike | None, force: bool, what: str = "it") -> None:
    """No command replaces a user's file without --force."""
    if path is not None and not force and (Path(path).exists() or Path(path).is_symlink()):
        raise ItmatchError(f"{path} exists; pass --force to replace {what}")
