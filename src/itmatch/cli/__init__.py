"""`itmatch` command line: the only place that parses argv, configures logging and turns errors into one line.

One module per command group (`data`, `train`, `eval`, `search` (+ `index`), `encode`, `serve`, `presets`,
`demo`), each a thin layer over the library; `--plugin FILE.py` (anywhere on the line, repeatable) registers a
method defined in one file before the command runs.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from itmatch.cli import data, demo, encode, presets, search, serve, train
from itmatch.cli import eval as evaluate
from itmatch.cli.common import Parser
from itmatch.errors import ItmatchError

_GROUPS = (train, evaluate, data, search, encode, serve, presets, demo)


def build_parser() -> Parser:
    p = Parser(prog="itmatch", description="Image-text matching: train, evaluate and compare six methods.")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    p.add_argument("--plugin", action="append", metavar="FILE.py",
                   help="register the method defined in this Python file (repeatable; installed packages "
                        "register through the entry-point group itmatch.methods)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in _GROUPS:
        group.register(sub)
    return p


def _plugins(argv: list[str]) -> tuple[list[str], list[str]]:
    """(plugin files, the other arguments): `--plugin FILE` / `--plugin=FILE` anywhere on the line."""
    files, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--plugin":
            if i + 1 >= len(argv):
                raise ItmatchError("--plugin needs a FILE.py (see `itmatch --help`)")
            files.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--plugin="):
            files.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return files, rest


def _share_cores_gracefully() -> None:
    """As many torch threads as CPUs this process may run on (`sched_getaffinity`: a container's or taskset's share,
    not the machine's), unless OMP_NUM_THREADS says otherwise. (The idle OpenMP threads' passive wait is set when
    the package is imported, before torch: `itmatch/__init__.py`.)"""
    if "OMP_NUM_THREADS" in os.environ or not hasattr(os, "sched_getaffinity"):
        return
    import torch

    torch.set_num_threads(max(len(os.sched_getaffinity(0)), 1))


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # BERT models are read from local directories only
    _share_cores_gracefully()
    try:
        files, rest = _plugins(list(sys.argv[1:] if argv is None else argv))
        if files:
            from itmatch.registry import load_plugin

            for path in files:
                load_plugin(path)
        args = build_parser().parse_args(rest)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(asctime)s %(name)s: %(message)s")
        return args.run(args)
    except ItmatchError as err:
        print(f"itmatch: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("itmatch: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        where = f": {err.filename}" if getattr(err, "filename", None) else ""
        print(f"itmatch: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2


def entry() -> None:
    sys.exit(main())
