"""`itmatch eval`: the papers' protocol for one checkpoint or an ensemble (a thin layer over `itmatch.evaluate`)."""

from __future__ import annotations

import argparse

from itmatch.cli.common import (
    add_model_args,
    non_negative_int,
    positive_float,
    positive_int,
    progress,
    refuse_existing,
)
from itmatch.errors import ItmatchError


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.tf32:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = True
    from itmatch.api import evaluate
    from itmatch.evaluation import format_table
    from itmatch.report import plot_recall_curves, write_json

    if args.ci and args.ci_resamples == 0:
        raise ItmatchError("--ci shows bootstrap intervals; --ci-resamples must then be positive")
    for path in (args.out, args.plot, args.save_sims):  # refused before any work
        refuse_existing(path, args.force)
    from itmatch import distributed, sharded
    from itmatch.device import check_device

    check_device(args.device)
    tiles = None
    if distributed.launched_by_torchrun() or args.tiles_dir:
        if args.cxc:
            raise ItmatchError("--cxc runs in one process, without torchrun or --tiles-dir")
        tiles = {"tiles_dir": args.tiles_dir, "tile_images": args.tile_images, "tile_captions": args.tile_captions}
    options = {}  # evaluation options of the methods that declare them (GSMN's box geometry)
    if args.box_compat:
        options["box_compat"] = args.box_compat
    if args.box_compat_batch is not None:
        options["box_compat_batch"] = args.box_compat_batch
    from itmatch.cost import DryRunFinished, eval_planner

    def planner(model: object) -> object:  # cross-attention: estimated time and memory before scoring
        return eval_planner(model, device=args.device, dry_run=args.dry_run, report=lambda m: print(m, flush=True))

    try:
        with sharded.process_group(args.device) as device:
            evaluation = evaluate(args.ckpt, args.data, split=args.split, protocol="fold5" if args.fold5 else "all",
                                  batch_size=args.batch_size, device=device, dtype=args.dtype, options=options,
                                  cxc=args.cxc, vocab=args.vocab or "", bert_path=args.bert_path or "",
                                  memory_budget_mb=args.memory_budget, tiles=tiles, ci_resamples=args.ci_resamples,
                                  ci_seed=args.ci_seed, planner=planner,
                                  progress=progress(args) and sharded.is_main())
    except DryRunFinished:
        print("dry run: nothing scored")
        return 0
    if evaluation is None:  # a torchrun rank other than 0
        return 0
    results = evaluation.results
    protocol = "5-fold 1K" if args.fold5 else f"{results['n_images']} images"
    print(format_table(results, title=f"{args.split} ({protocol}), {len(args.ckpt)} model(s)", ci=args.ci))
    if "cxc" in results:
        print("CxC " + "  ".join(f"{d} " + "/".join(f"{v:.1f}" for v in m.values())
                                 for d, m in results["cxc"].items()) + "  (R@1/R@5/R@10)")
    if args.out:
        write_json(results, args.out)
        print(f"results written to {args.out}")
    if args.plot:
        plot_recall_curves({"model" if len(args.ckpt) == 1 else "ensemble": results["curve"]}, args.plot)
        print(f"recall curves written to {args.plot}")
    if args.save_sims:
        evaluation.save_sims(args.save_sims)
        print(f"similarity matrix {evaluation.sims.shape} with image and caption ids written to {args.save_sims}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """The `eval` command."""
    e = sub.add_parser("eval", help="evaluate one checkpoint, or an ensemble of several (averaged similarities)")
    e.add_argument("ckpt", nargs="+", help="checkpoint file(s)")
    e.add_argument("--data", help="dataset directory (default: the one the model was trained on)")
    e.add_argument("--split", default="test", help="split to evaluate: test (F30K), testall (COCO), dev")
    e.add_argument("--fold5", action="store_true", help="COCO 1K protocol: mean over 5 folds of 1000 images")
    e.add_argument("--out", help="write the results as JSON")
    e.add_argument("--plot", help="write recall@K curves as PNG")
    e.add_argument("--save-sims", metavar="FILE.npz",
                   help="write the (ensembled) similarity matrix with its image and caption ids (numpy .npz)")
    e.add_argument("--force", action="store_true", help="replace existing --out, --plot or --save-sims files")
    e.add_argument("--batch-size", type=positive_int, default=128)
    add_model_args(e)
    e.add_argument("--cxc", metavar="DIR", help="also report CxC recalls (COCO testall; DIR holds cxc_annots files)")
    e.add_argument("--dtype", choices=("float64", "float32", "bfloat16"), default=None,
                   help="scoring dtype (default: the original's: float64 numpy for most, float32 for GSMN); "
                        "float32 is faster")
    e.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA (off: exact float32)")
    e.add_argument("--dry-run", action="store_true",
                   help="encode, print the estimated scoring time and peak memory, and exit without scoring")
    e.add_argument("--memory-budget", type=positive_float, metavar="MB",
                   help="memory for cross-attention intermediates per tile (changes speed, never scores)")
    e.add_argument("--box-compat", nargs="?", const="release", default="", choices=("release", "upstream"),
                   help="GSMN: score with the original's box geometry (cumulative in-place division, row aliasing) "
                        "to reproduce its numbers for its released checkpoints: 'release' (bare --box-compat) with "
                        "the code they were released with (x / height, y / width), 'upstream' with today's data.py")
    e.add_argument("--box-compat-batch", type=positive_int, default=None, metavar="N",
                   help="the original's eval batch size (default: the checkpoint's opt.batch_size, else 64; the "
                        "releases: 64 for F30K, 32 for COCO)")
    e.add_argument("--ci", action="store_true", help="show the bootstrap 95%% intervals in the table (always in --out)")
    e.add_argument("--ci-resamples", type=non_negative_int, default=1000, metavar="N",
                   help="bootstrap resamples over queries for the intervals (0: none)")
    e.add_argument("--ci-seed", type=non_negative_int, default=0, help="seed of the bootstrap resamples")
    e.add_argument("--tiles-dir", metavar="DIR",
                   help="keep every scored tile of images x captions in DIR and reuse them after an interruption "
                        "(keyed by a fingerprint of weights, data and options; never changes scores)")
    e.add_argument("--tile-images", type=positive_int, default=1024, metavar="N",
                   help="images per tile under torchrun / --tiles-dir (default 1024: bit-identical to one process)")
    e.add_argument("--tile-captions", type=non_negative_int, default=0, metavar="N",
                   help="captions per tile (default 0: all of them, or all of a fold's with --fold5)")
    e.set_defaults(run=_cmd_eval)
