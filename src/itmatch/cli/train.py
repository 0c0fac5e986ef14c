"""`itmatch train`: train a preset into a run directory (resumable; torchrun for several processes)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from itmatch.cli.common import epoch_lines, progress
from itmatch.errors import ItmatchError


def _cmd_train(args: argparse.Namespace) -> int:
    from itmatch.api import evaluate, train
    from itmatch.config import load_preset
    from itmatch.evaluation import format_table

    overrides = list(args.set or [])
    if args.data:
        overrides.append(f"data.path={json.dumps(args.data)}")
    if args.resume:
        if not args.out:
            raise ItmatchError("--resume needs --out DIR (the run directory to continue)")
        summary = train(None, args.out, resume=True, progress=progress(args), on_epoch=epoch_lines(args))
    else:
        if not args.preset:
            raise ItmatchError("train needs --preset NAME (see `itmatch presets`) or --resume with --out DIR")
        cfg = load_preset(args.preset, overrides)
        summary = train(cfg, args.out or f"runs/{Path(args.preset).stem}", progress=progress(args),
                        on_epoch=epoch_lines(args))
    out = Path(summary["out_dir"])
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 reports and tests
    print(f"trained {summary['epochs']} epochs ({summary['steps']} steps) in {summary['train_seconds']:.0f}s; "
          f"best dev score {summary['best_score']:.1f} at epoch {summary['best_epoch']}; checkpoints in {out}")
    if args.test:
        split = summary["config"]["data"]["test_split"]
        results = evaluate(out / "model_best.pt", split=split, progress=progress(args)).results
        print(format_table(results, title=f"test ({split})"))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """The `train` command."""
    t = sub.add_parser("train", help="train a model from a preset")
    t.add_argument("--preset", help="preset name (see `itmatch presets`) or a .toml file")
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a preset value")
    t.add_argument("--data", help="dataset directory (same as --set data.path=DIR)")
    t.add_argument("--out", help="run directory (default runs/PRESET)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--test", action="store_true", help="evaluate the best model on the test split afterwards")
    t.set_defaults(run=_cmd_train)
