"""Train the listed methods on the synthetic dataset, evaluate on its test split, write the README table.

    python scripts/results_table.py [--data data/synth_f30k] [--runs runs/results] [--rows LABEL ...]
                                    [--seeds 0 1 2] [--set SECTION.KEY=VALUE ...]

Each row is one `itmatch train` preset run from scratch with each of the seeds (`train.seed`; raw-image rows on
the same scenes, rendered to images/ with `itmatch data synth --render`), evaluated with `itmatch eval` on the
test split (1000 images, 5000 captions). Every run's results, with their provenance (code commit, libraries, data
fingerprint, config; `itmatch.provenance`), go to runs/results/SLUG.seedN.json, the mean and standard deviation
over the seeds to runs/results/SLUG.json, and the markdown table (mean ± std) is built from those files only: it
replaces the block between the markers `<!-- results:start -->` and `<!-- results:end -->` in README.md.
Numbers are never typed by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
import time
from pathlib import Path

ROWS = [
    # (row label, preset, extra overrides)
    ("VSE++", "vsepp_synth", []),
    ("VSE++, shuffled captions (control)", "vsepp_synth", ["data.shuffle_captions=true", "train.epochs=1"]),
    ("SCAN t2i AVG", "scan_synth_t2i_avg", []),
    ("VSE-infinity, BiGRU", "vse_infinity_synth_bigru", []),
    ("VSE-infinity, BiGRU, collapse guard fallback (the demo)", "vse_infinity_synth_bigru",
     ['train.collapse_guard="fallback"']),
    ("VSE-infinity, MiniLM", "vse_infinity_synth_minilm", []),
    ("HREM, MiniLM", "hrem_synth_minilm", []),
    ("HREM, MiniLM, no instance graph", "hrem_synth_minilm", ["model.warmup_iterations=1000000"]),
    ("VSRN", "vsrn_synth", []),
    ("VSRN, no caption branch", "vsrn_synth", ["model.caption_loss_weight=0"]),
    ("GSMN sparse", "gsmn_synth_sparse", []),
    ("GSMN sparse, VSE0 loss", "gsmn_synth_sparse", ["train.max_violation=false"]),
    ("VSE-infinity grid, tiny ResNet from scratch (raw images)", "vse_infinity_synth_grid", []),
]
START, END = "<!-- results:start -->", "<!-- results:end -->"
DEMO_START, DEMO_END = "<!-- demo-results:start -->", "<!-- demo-results:end -->"
DEMO_ROW = "VSE-infinity, BiGRU, collapse guard fallback (the demo)"  # seed 0 of this row is `make demo`'s run
SAVE_EVERY = 100  # steps between resumable checkpoints of a results run


def slug_of(label: str) -> str:
    return label.lower().replace(" ", "_").replace(",", "").replace("(", "").replace(")", "").replace("+", "p")


def run_row(label: str, preset: str, sets: list[str], data: Path, runs: Path, seed: int = 0,
            extra: list[str] | None = None) -> dict:
    """Train and evaluate one row with one seed (cached: a run evaluated after its best checkpoint is reused).

    A run killed part way (the table takes hours) continues from its last checkpoint, written every
    `SAVE_EVERY` steps; resuming replays the uninterrupted run exactly, so the numbers do not depend on it.
    """
    from itmatch.api import evaluate
    from itmatch.config import load_preset
    from itmatch.training import BEST, CHECKPOINT, fit

    slug = f"{slug_of(label)}.seed{seed}"
    out = runs / slug
    sets = [*sets, *(extra or [])]
    cfg = load_preset(preset, [f"data.path={json.dumps(str(data))}", *sets, f"train.seed={seed}",
                               f"train.save_every={SAVE_EVERY}"])
    if (out / BEST).is_file() and (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text())
    else:
        summary = fit(cfg, out, resume=(out / CHECKPOINT).is_file())
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    cached = runs / f"{slug}.json"
    if cached.is_file() and cached.stat().st_mtime > (out / BEST).stat().st_mtime:
        row = json.loads(cached.read_text())
        if row.get("preset") == preset and row.get("sets") == sets and row.get("seed") == seed:
            return row  # evaluated after its best checkpoint was written: nothing to redo
    results = evaluate(out / BEST, data, split="test", ci_resamples=1000).results
    results.pop("curve", None)
    row = {"label": label, "preset": preset, "sets": sets, "seed": seed, "train_seconds": summary["train_seconds"],
           "epochs": summary["epochs"], **results}
    (runs / f"{slug}.json").write_text(json.dumps(row, indent=2))
    return row


METRICS = [("i2t", "R@1"), ("i2t", "R@5"), ("i2t", "R@10"), ("t2i", "R@1"), ("t2i", "R@5"), ("t2i", "R@10"),
           ("rsum",), ("contrast", "t2i"), ("contrast", "i2t"), ("train_seconds",)]


def _get(row: dict, key: tuple[str, ...]) -> float | None:
    value: object = row
    for k in key:
        if not isinstance(value, dict) or k not in value:
            return None
        value = value[k]
    return float(value)  # type: ignore[arg-type]


def _commit(row: dict) -> str:
    git = (row.get("provenance") or {}).get("git")
    return f"{git['commit'][:12]}{' (dirty)' if git['dirty'] else ''}" if git else "unknown (no git)"


def aggregate(per_seed: list[dict], files: list[str]) -> dict:
    """Mean and sample standard deviation (ddof 1; 0 for one seed) of every metric over the seeds' results."""
    import numpy as np

    first = per_seed[0]
    out: dict = {"label": first["label"], "preset": first["preset"], "sets": first["sets"],
                 "seeds": [r["seed"] for r in per_seed], "epochs": first["epochs"], "files": files,
                 "commits": sorted({_commit(r) for r in per_seed}),
                 "mean": {}, "std": {}}
    for key in METRICS:
        values = [v for v in (_get(r, key) for r in per_seed) if v is not None]
        if len(values) == len(per_seed):
            name = "/".join(key)
            out["mean"][name] = float(np.mean(values))
            out["std"][name] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return out


def _cell(agg: dict, name: str, bold: bool = False) -> str:
    mean, std = agg["mean"][name], agg["std"][name]
    text = f"{mean:.1f}" + (f" ± {std:.1f}" if len(agg["seeds"]) > 1 else "")
    return f"**{text}**" if bold else text


def markdown(aggs: list[dict]) -> str:
    """The README table from aggregated rows (`aggregate`): mean ± std over the seeds."""
    head = ("| method | preset | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum | contrast t2i / i2t (%) "
            "| train time |")
    lines = [head, "|" + "---|" * 11]
    for a in aggs:
        cells = [_cell(a, f"{d}/{k}") for d in ("i2t", "t2i") for k in ("R@1", "R@5", "R@10")]
        contrast = (f"{_cell(a, 'contrast/t2i')} / {_cell(a, 'contrast/i2t')}" if "contrast/t2i" in a["mean"]
                    else "–")
        preset = f"`{a['preset']}`" + "".join(f" `{s}`" for s in a["sets"])
        lines.append(f"| {a['label']} | {preset} | " + " | ".join(cells) + f" | {_cell(a, 'rsum', bold=True)} | "
                     f"{contrast} | {a['mean']['train_seconds'] / 60:.1f} min ({a['epochs']} ep) |")
    return "\n".join(lines)


def demo_paragraph(row: dict, file: str) -> str:
    """The README's figures for `make demo`, quoted from seed 0 of the demo's row (the same preset, overrides, data
    and seed as `itmatch demo`, so the same run)."""
    ci = row.get("ci", {})
    interval = f" (bootstrap 95 % interval {ci['rsum'][0]:.1f}–{ci['rsum'][1]:.1f})" if "rsum" in ci else ""
    contrast = row.get("contrast") or {}
    pairs = f", contrast pairs {contrast['t2i']:.1f} % / {contrast['i2t']:.1f} % (chance 50 %)" if contrast else ""
    text = (f"The demo's run is seed 0 of the table's row \"{row['label']}\" (`{file}`, code {_commit(row)}): "
            f"test rsum **{row['rsum']:.1f}**{interval}, i2t R@1 {row['i2t']['R@1']:.1f}, t2i R@1 "
            f"{row['t2i']['R@1']:.1f} (chance: rsum 3.2, R@1 0.1){pairs}, {row['train_seconds'] / 60:.1f} min of "
            f"training ({row['epochs']} epochs).")
    # Wrapped like the rest of the README. Breaks fall only on spaces, never inside a `code` span (none has one),
    # and a line that would open with a list or quote marker goes back onto the line before it.
    lines: list[str] = []
    for line in textwrap.wrap(text, width=116, break_long_words=False, break_on_hyphens=False):
        if lines and re.match(r"([-*+>#]|\d+[.)])(\s|$)", line):
            lines[-1] += " " + line
        else:
            lines.append(line)
    return "\n".join(lines)


def _replace_block(text: str, start: str, end: str, body: str) -> str:
    if start not in text or end not in text:
        raise SystemExit(f"README lacks the markers {start} ... {end}")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    return f"{before}{start}\n{body}\n{end}{after}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/synth_f30k")
    ap.add_argument("--runs", default="runs/results")
    ap.add_argument("--readme", default="README.md")
    ap.add_argument("--rows", nargs="*", help="train/evaluate only rows whose label contains one of these; "
                                              "the table is written only when every row has run")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="train.seed of each run of a row")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override applied to every row (quick checks; the README table uses none)")
    args = ap.parse_args(argv)
    from itmatch.config import load_preset

    data, runs = Path(args.data), Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    selected = [row for row in ROWS if not args.rows or any(sel in row[0] for sel in args.rows)]
    # Raw-image rows read the rendered scenes; rendering rewrites the same feature files byte for byte.
    render = any(load_preset(preset).data.source == "images" for _, preset, _ in selected)
    if not (data / "train_ims.npy").is_file() or (render and not (data / "id_mapping.json").is_file()):
        from itmatch.cli import main as cli_main

        assert cli_main(["-q", "data", "synth", "--out", str(data), *(["--render"] if render else [])]) == 0
    aggs = []
    for label, preset, sets in selected:
        per_seed, files = [], []
        for seed in args.seeds:
            started = time.perf_counter()
            per_seed.append(run_row(label, preset, sets, data, runs, seed, args.set))
            files.append(f"{slug_of(label)}.seed{seed}.json")
            print(f"{label}, seed {seed}: rsum {per_seed[-1]['rsum']:.1f} ({time.perf_counter() - started:.0f}s)",
                  flush=True)
        aggs.append(aggregate(per_seed, files))
        (runs / f"{slug_of(label)}.json").write_text(json.dumps(aggs[-1], indent=2))
    # The table is built from the files just written, never from values held in memory.
    aggs = [json.loads((runs / f"{slug_of(label)}.json").read_text()) for label, _, _ in selected]
    commits = sorted({c for a in aggs for c in a["commits"]})
    table = (markdown(aggs) + f"\n\nGenerated by `scripts/results_table.py` from `{runs}/*.json` (mean ± std over "
             f"seeds {', '.join(map(str, args.seeds))}; code {'; '.join(commits)}).")
    print(table)
    if len(aggs) < len(ROWS):
        return 0
    readme = Path(args.readme)
    text = _replace_block(readme.read_text(encoding="utf-8"), START, END, table)
    demo_file = f"{slug_of(DEMO_ROW)}.seed0.json"
    if 0 in args.seeds:
        text = _replace_block(text, DEMO_START, DEMO_END,
                              demo_paragraph(json.loads((runs / demo_file).read_text()), demo_file))
    readme.write_text(text, encoding="utf-8")
    print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
