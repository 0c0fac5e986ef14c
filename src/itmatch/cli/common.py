"""What every command shares: the one-line-error parser, progress-bar policy and the model-loading options."""

from __future__ import annotations

import argparse
import sys

from itmatch.errors import ItmatchError


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one `ItmatchError` line (no usage dump)."""

    def error(self, message: str) -> None:
        raise ItmatchError(f"{message} (see `{self.prog} --help`)")


def progress(args: argparse.Namespace) -> bool:
    """Progress bars only on a terminal and without --quiet."""
    return not args.quiet and sys.stderr.isatty()


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--device, --vocab and --bert-path: where a checkpoint runs and what a released one needs besides weights."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", help="vocabulary (.json, or the original's .pkl) of an original checkpoint "
                        "(default: found next to --data)")
    parser.add_argument("--bert-path", help="BERT directory (config + vocab.txt) of an original BERT checkpoint")
