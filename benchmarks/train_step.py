"""One training step of every method at the papers' sizes, and where its time goes.

Batch 128, 1024-d joint embeddings, 36 regions x 2048-d, captions of Flickr30K length (the synthetic f30k captions,
about 12 words), word vocabulary 8,500; BERT methods get a random bert-base-sized BertModel written in a temporary
directory (no download). Each method is built from its F30K preset through the training code's own pieces
(`resolve_config`, `create_model`, `build_recipe`, the recipe's optimizer, `CaptionDataset` batches with the
preset's augmentation) and one step is timed as `itmatch.training` runs it, split into:

    data        building the batch (main process, as `data.workers=0`)
    encoders    model.encode_image + model.encode_text
    similarity  model.similarity
    loss        the rest of the forward pass (loss, training-only modules such as VSRN's captioner)
    backward    loss.backward()
    optimizer   gradient clipping + optimizer.step() + zero_grad()

    python benchmarks/train_step.py [--methods vsepp,scan,...] [--steps 3] [--batch 128] [--json out.json]
    OMP_NUM_THREADS=1 python benchmarks/train_step.py --clock thread ...  # one core, CPU time: robust to load
    python benchmarks/train_step.py --device cuda [--amp bf16|fp16] ...  # a GPU: wall clock, synchronised

`--amp` runs the step as `itmatch.training` does under `train.amp` (autocast; fp16 with a GradScaler). Each row
also gives samples/s (batch / step) and, on a GPU, the peak memory allocated.

Medians over `--steps` steps after one warm-up step; the GEMM rate of the machine (a 4608 x 2048 @ 2048 x 1024
product, the region encoders' shape) is measured in the same run. `floor s` is the step's matrix-product work
(forward + backward, counted by torch.utils.flop_counter: linear layers, GRUs, attention products) at that rate;
`floor/step` near 1 means the step is GEMM/GRU work at the machine's rate. `mm share` is the fraction of one
more step's CPU time (torch.profiler) spent inside matrix products at the rate their shapes actually get (the GRU's
per-word products are far smaller than the floor's); the rest is elementwise work, copies and autograd, whose three
largest ops are named. `mm rate` is the step's GFLOP over the time inside those products, as a fraction of the GEMM
rate: near 1, the products run at the machine's rate and only the rest of the step can shrink. The load average is
printed per row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common import add_clock_argument, chosen_clock, synchronised

PRESETS = {  # method label -> (preset, extra overrides)
    "vsepp": ("vsepp_f30k_precomp", []),
    "scan_t2i": ("scan_f30k_t2i_lse", []),
    "scan_i2t": ("scan_f30k_i2t_lse", []),
    "vse_inf_bigru": ("vse_infinity_f30k_bigru", []),
    "vsrn": ("vsrn_f30k_precomp", []),
    "gsmn_sparse": ("gsmn_f30k_sparse", []),
    "vse_inf_bert": ("vse_infinity_f30k_bert", ["bert"]),
    "hrem": ("hrem_f30k_bert", ["bert"]),
}
PHASES = ("data", "encoders", "similarity", "loss", "backward", "optimizer")
VOCAB = 8500
CLOCK = time.perf_counter


def gemm_gflops(device: torch.device, seconds: float = 2.0) -> float:
    from common import matmul_gflops

    a, b = torch.randn(128 * 36, 2048, device=device), torch.randn(2048, 1024, device=device)
    return matmul_gflops(a, b, seconds=seconds, clock=CLOCK)


def write_data(root: Path, batch: int) -> Path:
    from itmatch.cli import main as cli_main
    from itmatch.data.synthetic import generate

    data = root / "synth"
    generate(data, variant="f30k", seed=0, dim=2048, sizes={"train": batch, "dev": 10, "test": 10})
    assert cli_main(["-q", "data", "vocab", str(data)]) == 0
    return data


def write_bert_base(root: Path) -> Path:
    """A random bert-base-uncased-sized BertModel (12 x 768, vocab 30,522) and a small wordpiece vocabulary."""
    from transformers import BertConfig, BertModel


    path = root / "bert-base"
    path.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    for split in ("train", "dev", "test"):
        for line in (root / "synth" / f"{split}_caps.txt").read_text(encoding="utf-8").splitlines():
            words += [w for w in line.lower().replace(".", " .").replace(",", " ,").split() if w not in words]
    (path / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    BertModel(BertConfig()).save_pretrained(path)
    return path


class Timer:
    """Accumulates the wall time of wrapped callables per phase."""

    def __init__(self) -> None:
        self.t = dict.fromkeys(PHASES, 0.0)

    def wrap(self, obj: object, name: str, phase: str) -> None:
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            start = CLOCK()
            try:
                return fn(*args, **kwargs)
            finally:
                self.t[phase] += CLOCK() - start

        setattr(obj, name, timed)


@dataclasses.dataclass
class Setup:
    """One method built as `itmatch.training` builds it, ready for `train_step`."""

    label: str
    preset: str
    model: Any
    recipe: Any
    loss_module: Any
    optimizer: Any
    source: Any  # the epoch's batches (`_Batches`), augmentation included
    grad_clip: float
    device: torch.device = torch.device("cpu")
    amp: torch.dtype | None = None  # autocast dtype (`train.amp`), None for float32
    # fp16's GradScaler (disabled otherwise), as `itmatch.training` makes it
    scaler: Any = dataclasses.field(default_factory=lambda: torch.amp.GradScaler("cuda", enabled=False))

    def batch(self, step: int) -> Any:
        """Batch `step` of the epoch (cycling), on the setup's device."""
        batch = self.source[step % len(self.source)]
        return batch if self.device.type == "cpu" else batch.to(self.device)


def build(label: str, data: Path, bert: Path | None, batch_size: int, device: str = "cpu",
          amp: torch.dtype | None = None) -> Setup:
    """The model, recipe, optimizer and batches of `label`'s F30K preset at `batch_size`, on `device`."""
    from itmatch.config import load_preset
    from itmatch.data.augment import AugmentedCaptions
    from itmatch.data.precomp import CaptionDataset
    from itmatch.method import SplitInputs
    from itmatch.registry import create_model, method_spec
    from itmatch.training import _Batches, _TrainingLoss, build_recipe, epoch_batches, resolve_config

    preset, extra = PRESETS[label]
    overrides = [f"data.path={json.dumps(str(data))}", f"data.batch_size={batch_size}"]
    if "bert" in extra:
        overrides.append(f"model.bert_path={json.dumps(str(bert))}")
    cfg, split, vocab = resolve_config(load_preset(preset, overrides))
    if any(f.name == "vocab_size" for f in dataclasses.fields(cfg.model)) and "bert" not in extra:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=VOCAB))
    tc = cfg.train
    torch.manual_seed(tc.seed)
    model = create_model(cfg.model)
    recipe = build_recipe(model, cfg)
    loss_module = _TrainingLoss(recipe).to(device)
    optimizer = recipe.optimizer(tc.lr)
    spec = method_spec(cfg.model.name)
    provider = spec.inputs(cfg.model)
    found = provider.for_split(split) if provider is not None else SplitInputs()
    dataset = CaptionDataset(split, vocab, tokens=found.token_ids, image_inputs=found.images,
                             caption_inputs=found.captions)
    augment = None
    if tc.region_drop or tc.word_noise:
        augment = AugmentedCaptions(dataset, vocab, region_drop=tc.region_drop, word_noise=tc.word_noise)
    batches = epoch_batches(len(dataset), batch_size, tc.seed, 0)
    source = _Batches(dataset, batches, augment, (tc.seed, 0, 0))
    loss_module.train()
    scaler = torch.amp.GradScaler("cuda", enabled=amp is torch.float16)
    return Setup(label, preset, model, recipe, loss_module, optimizer, source, tc.grad_clip, torch.device(device),
                 amp, scaler)


def batch_kwargs(setup: Setup, batch: Any) -> dict:
    """The keyword inputs `_TrainingLoss` takes besides images, captions and lengths."""
    kw = {"image_lengths": batch.image_lengths} if batch.image_lengths is not None else {}
    return kw | batch.inputs | batch.extras(setup.recipe.batch_inputs)


def train_step(setup: Setup, batch: Any, step: int, timer: Timer | None = None) -> torch.Tensor:
    """One training step on a built batch as `itmatch.training` runs it (forward, loss, backward, clipping,
    optimizer step), booking the phases in `timer` (encoders and similarity through its wrappers); the loss."""
    setup.recipe.on_step_start(step, len(setup.source))
    t0 = CLOCK()
    with torch.autocast(setup.device.type, dtype=setup.amp, enabled=setup.amp is not None):
        loss = setup.loss_module(batch.images, batch.captions, batch.lengths, epoch=0,
                                 **batch_kwargs(setup, batch))["loss"]
    loss = loss.float()
    t1 = CLOCK()
    setup.optimizer.zero_grad(set_to_none=True)
    setup.scaler.scale(loss).backward()
    t2 = CLOCK()
    if setup.grad_clip > 0:
        setup.scaler.unscale_(setup.optimizer)
        torch.nn.utils.clip_grad_norm_(setup.loss_module.parameters(), setup.grad_clip)
    setup.scaler.step(setup.optimizer)
    setup.scaler.update()
    if timer is not None:
        timer.t["loss"] = t1 - t0 - timer.t["encoders"] - timer.t["similarity"]
        timer.t["backward"] = t2 - t1
        timer.t["optimizer"] = CLOCK() - t2
    return loss.detach()


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")


def profile_step(setup: Setup, batch: Any, step: int) -> dict:
    """Where one more training step's time goes (torch.profiler, self time of every op): the fraction inside matrix
    products (`MATMUL_OPS`: linear layers, GRU gates, attention products, forward and backward) at whatever rate
    their shapes get, their total seconds (the step's GFLOP over these gives their rate), and the three largest
    other ops with their shares."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(setup, batch, step)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    others = sorted((e for e in events if e.key not in MATMUL_OPS), key=lambda e: -e.self_cpu_time_total)[:3]
    return {"share": mm / total, "mm_s": mm / 1e6,
            "top_other": [(e.key.removeprefix("aten::"), round(e.self_cpu_time_total / total, 3)) for e in others]}


AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def run_method(label: str, data: Path, bert: Path | None, gemm: float, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    setup = build(label, data, bert, args.batch, args.device, AMP[args.amp])
    model, recipe, loss_module, optimizer = setup.model, setup.recipe, setup.loss_module, setup.optimizer
    preset = setup.preset
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = Timer()
    timer.wrap(model, "encode_image", "encoders")
    timer.wrap(model, "encode_text", "encoders")
    timer.wrap(model, "similarity", "similarity")
    rows = []
    for step in range(args.steps + 1):
        timer.t = dict.fromkeys(PHASES, 0.0)
        start = CLOCK()
        batch = setup.batch(step)
        timer.t["data"] = CLOCK() - start
        train_step(setup, batch, step, timer)
        if step:  # the first step warms up allocators and kernels
            rows.append({**timer.t, "step": CLOCK() - start})
    med = {k: statistics.median(r[k] for r in rows) for k in (*PHASES, "step")}
    peak_gpu = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    # The matrix-product work of one step (GRU and linear layers decompose into mm/addmm under the counter)
    from torch.utils.flop_counter import FlopCounterMode

    batch = setup.batch(0)
    kw = batch_kwargs(setup, batch)
    with FlopCounterMode(display=False) as counter:
        loss_module(batch.images, batch.captions, batch.lengths, epoch=0, **kw)["loss"].backward()
    optimizer.zero_grad(set_to_none=True)
    gflop = counter.get_total_flops() / 1e9
    # The CPU profile: on a GPU the CPU's self times are launches, not the work
    prof = profile_step(setup, batch, args.steps + 1) if device.type == "cpu" else None
    n_params = sum(p.numel() for p in recipe.parameters() if p.requires_grad)
    return {"method": label, "preset": preset, "device": str(device), "amp": args.amp,
            "params_m": round(n_params / 1e6, 1), "mean_caption_tokens": float(batch.lengths.float().mean()),
            **{k: round(v, 3) for k, v in med.items()}, "samples_per_s": round(args.batch / med["step"], 1),
            "peak_gpu_gb": None if peak_gpu is None else round(peak_gpu, 2),
            "gflop": round(gflop, 1), "gemm_floor_s": round(gflop / gemm, 3),
            "gemm_share": None if prof is None else round(prof["share"], 2),
            "mm_rate": None if prof is None else round(gflop / prof["mm_s"] / gemm, 2),
            "top_other": [] if prof is None else prof["top_other"],
            "steps": [round(r["step"], 3) for r in rows], "loadavg": os.getloadavg()[0]}


def _cell(value: float | None, width: int) -> str:
    return f"{'-':>{width}s}" if value is None else f"{value:{width}.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(PRESETS), help=f"comma-separated, of {', '.join(PRESETS)}")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--json", help="write the rows as JSON")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--amp", choices=sorted(AMP), default="none", help="autocast as train.amp (fp16: GPU only)")
    add_clock_argument(ap)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    if device.type == "cuda" and args.clock == "thread":
        ap.error("--clock thread times one CPU thread; a GPU step needs the wall clock")
    if args.amp == "fp16" and device.type != "cuda":
        ap.error("--amp fp16 needs a GPU (its GradScaler is CUDA's); on the CPU use --amp bf16")
    global CLOCK
    CLOCK = synchronised(chosen_clock(ap, args), device)
    methods = args.methods.split(",")
    if unknown := [m for m in methods if m not in PRESETS]:
        ap.error(f"unknown method(s) {unknown}")
    with tempfile.TemporaryDirectory(prefix="itmatch_train_step_") as tmp:
        data = write_data(Path(tmp), args.batch)
        bert = write_bert_base(Path(tmp)) if any("bert" in PRESETS[m][1] for m in methods) else None
        gemm = gemm_gflops(device)
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"threads {torch.get_num_threads()}"
        print(f"device {device} ({where}), amp {args.amp}, clock {args.clock}, float32 GEMM {gemm:.0f} GFLOP/s "
              f"(4608x2048 @ 2048x1024), batch {args.batch}, medians of {args.steps} steps after a warm-up")
        head = f"{'method':14s} {'step s':>7s} {'samples/s':>9s} " + " ".join(f"{p:>10s}" for p in PHASES)
        head += "  GFLOP  floor s  floor/step  mm share  mm rate  peak GB  load  largest other ops"
        print(head)
        rows = []
        for m in methods:
            r = run_method(m, data, bert, gemm, args)
            rows.append(r)
            floor = f" {r['gflop']:6.0f} {r['gemm_floor_s']:8.3f} {r['gemm_floor_s'] / r['step']:10.2f}"
            floor += f" {_cell(r['gemm_share'], 9)} {_cell(r['mm_rate'], 8)} {_cell(r['peak_gpu_gb'], 8)}"
            others = ", ".join(f"{name} {share:.0%}" for name, share in r["top_other"])
            print(f"{m:14s} {r['step']:7.3f} {r['samples_per_s']:9.1f} " + " ".join(f"{r[p]:10.3f}" for p in PHASES)
                  + f"{floor}  {r['loadavg']:4.1f}  {others}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"gemm_gflops": gemm, "device": str(device), "amp": args.amp,
                                               "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
