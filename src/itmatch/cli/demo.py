"""`itmatch demo`: synthesise the dataset, train, evaluate and report in a few minutes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from itmatch.cli.common import progress


def _cmd_demo(args: argparse.Namespace) -> int:
    """Synthesise the dataset, train VSE++ for a few minutes, evaluate on test, write the report."""
    from itmatch.api import evaluate
    from itmatch.config import load_preset
    from itmatch.data.synthetic import generate
    from itmatch.data.vocab import write_vocab
    from itmatch.evaluation import format_table
    from itmatch.report import plot_recall_curves, write_json
    from itmatch.training import BEST, fit

    out, data = Path(args.out), Path(args.data)
    show = progress(args)
    if not (data / "train_ims.npy").is_file():
        print(f"[1/3] synthesising the F30K-like dataset in {data} ...", flush=True)
        generate(data, variant="f30k", seed=0, progress=show, render=False)
        write_vocab(data)
    else:
        print(f"[1/3] using the synthetic dataset in {data}", flush=True)
    cfg = load_preset("vsepp_synth", [f"data.path={json.dumps(str(data))}", *(args.set or [])])
    print(f"[2/3] training VSE++ (preset vsepp_synth, {cfg.train.epochs} epochs) into {out} ...", flush=True)
    if (out / "checkpoint.pt").exists():
        import shutil

        shutil.rmtree(out)
    summary = fit(cfg, out, progress=show)
    print(f"      {summary['steps']} steps in {summary['train_seconds']:.0f}s, best dev rsum "
          f"{summary['best_score']:.1f} (epoch {summary['best_epoch']})", flush=True)
    print("[3/3] evaluating on the test split ...", flush=True)
    results = evaluate(out / BEST, data, split="test", progress=show).results
    results["train_seconds"] = summary["train_seconds"]
    print(format_table(results, title="VSE++ on the synthetic F30K-like test split (1000 images, 5000 captions)"))
    write_json(results, out / "report.json")
    plot_recall_curves({"VSE++": results["curve"]}, out / "recall.png", title="VSE++, synthetic test split")
    print(f"report: {out / 'report.json'}, {out / 'recall.png'}; TensorBoard logs: {out / 'tb'}")
    print("search the test split in a browser (http://127.0.0.1:8000/):")
    for line in serve_commands(out / BEST, data, out):
        print(f"  {line}")
    if args.raw:
        _demo_raw(data, out / "raw", args)
    return 0


def _demo_raw(data: Path, out: Path, args: argparse.Namespace) -> None:
    """Extended demo: render the scenes and train VSE-infinity's grid variant on the pixels, from scratch."""
    from itmatch.api import evaluate
    from itmatch.config import load_preset
    from itmatch.data.synthetic import generate
    from itmatch.evaluation import format_table
    from itmatch.report import write_json
    from itmatch.training import BEST, fit

    show = progress(args)
    if not (data / "id_mapping.json").is_file():
        print(f"[raw 1/3] rendering the scenes to {data / 'images'} (the feature files stay the same) ...", flush=True)
        generate(data, variant="f30k", seed=0, progress=show, render=True)
    cfg = load_preset("vse_infinity_synth_grid", [f"data.path={json.dumps(str(data))}", *(args.set or [])])
    print(f"[raw 2/3] training VSE-infinity grid (tiny ResNet from scratch, preset vse_infinity_synth_grid, "
          f"{cfg.train.epochs} epochs) into {out} ...", flush=True)
    if (out / "checkpoint.pt").exists():
        import shutil

        shutil.rmtree(out)
    summary = fit(cfg, out, progress=show)
    print("[raw 3/3] evaluating on the test split ...", flush=True)
    results = evaluate(out / BEST, data, split="test", progress=show).results
    results["train_seconds"] = summary["train_seconds"]
    results.pop("curve", None)
    print(format_table(results, title="VSE-infinity grid on the rendered test scenes (1000 images, 5000 captions)"))
    write_json(results, out / "report.json")


def serve_commands(ckpt: Path, data: Path, out: Path, itmatch: str = "itmatch") -> list[str]:
    """The commands that index a model's test split (images and captions) and serve them (`itmatch serve`)."""
    images, captions = out / "index_images", out / "index_captions"
    return [f"{itmatch} index build {ckpt} --data {data} --gallery images --out {images}",
            f"{itmatch} index build {ckpt} --data {data} --gallery captions --out {captions}",
            f"{itmatch} serve --index {images} --index {captions} --port 8000"]


def register(sub: argparse._SubParsersAction) -> None:
    """The `demo` command."""
    dm = sub.add_parser("demo", help="synthesise data, train VSE++, evaluate and report (a few minutes)")
    dm.add_argument("--out", default="runs/demo")
    dm.add_argument("--data", default="data/synth_f30k")
    dm.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    dm.add_argument("--raw", action="store_true",
                    help="extended mode: also render the scenes and train a raw-image model on them (~10 min more)")
    dm.set_defaults(run=_cmd_demo)
