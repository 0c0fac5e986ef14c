"""`itmatch demo`: synthesise the dataset, train, evaluate and draw a report in a few minutes (`itmatch.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from itmatch.cli.common import epoch_lines, progress
from itmatch.demo import serve_commands


def _cmd_demo(args: argparse.Namespace) -> int:
    """Synthesise the dataset, train the demo model, evaluate on test, draw the report."""
    from itmatch.demo import run_demo, run_raw_demo
    from itmatch.training import BEST

    out, data = Path(args.out), Path(args.data)
    run_demo(out, data, sets=args.set or [], progress=progress(args), on_epoch=epoch_lines(args),
             log=lambda line: print(line, flush=True))
    print("search the test split in a browser (http://127.0.0.1:8000/):")
    for line in serve_commands(out / BEST, data, out):
        print(f"  {line}")
    if args.raw:
        run_raw_demo(data, out / "raw", sets=args.set or [], progress=progress(args), on_epoch=epoch_lines(args),
                     log=lambda line: print(line, flush=True))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """The `demo` command."""
    dm = sub.add_parser("demo", help="synthesise data, train VSE-infinity, evaluate and draw a report (a few minutes)")
    dm.add_argument("--out", default="runs/demo")
    dm.add_argument("--data", default="data/synth_f30k")
    dm.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    dm.add_argument("--raw", action="store_true",
                    help="extended mode: also render the scenes and train a raw-image model on them (~10 min more)")
    dm.set_defaults(run=_cmd_demo)
