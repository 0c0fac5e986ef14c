"""Train the listed methods on the synthetic dataset, evaluate on its test split, write the README table.

    python scripts/results_table.py [--data data/synth_f30k] [--runs runs/results] [--rows LABEL ...]

Each row is one `itmatch train` preset run from scratch with a fixed seed (raw-image rows on the same scenes,
rendered to images/ with `itmatch data synth --render`), evaluated with `itmatch eval` on the
test split (1000 images, 5000 captions). The markdown table replaces the block between the markers
`<!-- results:start -->` and `<!-- results:end -->` in README.md, and the raw figures go to runs/results/*.json.
Numbers are never typed by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROWS = [
    # (row label, preset, extra overrides)
    ("VSE++", "vsepp_synth", []),
    ("VSE++, shuffled captions (control)", "vsepp_synth", ["data.shuffle_captions=true", "train.epochs=1"]),
    ("SCAN t2i AVG", "scan_synth_t2i_avg", []),
    ("VSE-infinity, BiGRU", "vse_infinity_synth_bigru", []),
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


def run_row(label: str, preset: str, sets: list[str], data: Path, runs: Path) -> dict:
    from itmatch.api import evaluate
    from itmatch.config import load_preset
    from itmatch.training import BEST, fit

    slug = label.lower().replace(" ", "_").replace(",", "").replace("(", "").replace(")", "").replace("+", "p")
    out = runs / slug
    cfg = load_preset(preset, [f"data.path={json.dumps(str(data))}", *sets])
    if (out / BEST).is_file() and (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text())
    else:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        summary = fit(cfg, out)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    cached = runs / f"{slug}.json"
    if cached.is_file() and cached.stat().st_mtime > (out / BEST).stat().st_mtime:
        row = json.loads(cached.read_text())
        if row.get("preset") == preset and row.get("sets") == sets:
            return row  # evaluated after its best checkpoint was written: nothing to redo
    results = evaluate(out / BEST, data, split="test").results
    results.pop("curve", None)
    row = {"label": label, "preset": preset, "sets": sets, "train_seconds": summary["train_seconds"],
           "epochs": summary["epochs"], **results}
    (runs / f"{slug}.json").write_text(json.dumps(row, indent=2))
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| method | preset | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum | contrast t2i / i2t (%) "
            "| train time |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        i, t = r["i2t"], r["t2i"]
        c = r.get("contrast") or {}
        contrast = f"{c['t2i']:.1f} / {c['i2t']:.1f}" if c else "–"
        preset = f"`{r['preset']}`" + "".join(f" `{s}`" for s in r["sets"])
        lines.append(f"| {r['label']} | {preset} | {i['R@1']:.1f} | {i['R@5']:.1f} | {i['R@10']:.1f} | "
                     f"{t['R@1']:.1f} | {t['R@5']:.1f} | {t['R@10']:.1f} | **{r['rsum']:.1f}** | {contrast} | "
                     f"{r['train_seconds'] / 60:.1f} min ({r['epochs']} ep) |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/synth_f30k")
    ap.add_argument("--runs", default="runs/results")
    ap.add_argument("--readme", default="README.md")
    ap.add_argument("--rows", nargs="*", help="train/evaluate only rows whose label contains one of these; "
                                              "the table is written only when every row has run")
    args = ap.parse_args()
    from itmatch.config import load_preset

    data, runs = Path(args.data), Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    selected = [row for row in ROWS if not args.rows or any(sel in row[0] for sel in args.rows)]
    # Raw-image rows read the rendered scenes; rendering rewrites the same feature files byte for byte.
    render = any(load_preset(preset).data.source == "images" for _, preset, _ in selected)
    if not (data / "train_ims.npy").is_file() or (render and not (data / "id_mapping.json").is_file()):
        from itmatch.cli import main as cli_main

        assert cli_main(["-q", "data", "synth", "--out", str(data), *(["--render"] if render else [])]) == 0
    rows = []
    for label, preset, sets in selected:
        started = time.perf_counter()
        rows.append(run_row(label, preset, sets, data, runs))
        print(f"{label}: rsum {rows[-1]['rsum']:.1f} ({time.perf_counter() - started:.0f}s)", flush=True)
    table = markdown(rows)
    print(table)
    if len(rows) < len(ROWS):
        return 0
    readme = Path(args.readme)
    text = readme.read_text(encoding="utf-8")
    if START in text and END in text:
        before, rest = text.split(START, 1)
        _, after = rest.split(END, 1)
        readme.write_text(f"{before}{START}\n{table}\n{END}{after}", encoding="utf-8")
        print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
