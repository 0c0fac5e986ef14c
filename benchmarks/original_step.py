"""One training step of an unmodified original beside itmatch's, on the same batch, alternating.

    python benchmarks/original_step.py --original ~/src/vsepp --method vsepp [--rounds 5]
    python benchmarks/original_step.py --original ~/src/SCAN --method scan_t2i
    python benchmarks/original_step.py --original ~/src/vse_infty --method vse_inf_bigru   # the `bigru` branch
    OMP_NUM_THREADS=1 python benchmarks/original_step.py ... --clock thread   # one core, CPU time

`--original` is the user's own checkout of the original repository (github.com/fartashf/vsepp,
github.com/kuanghuei/SCAN, github.com/woodfrog/vse_infty at its `bigru` branch); nothing of it is copied into
itmatch. Its model module is imported from that directory as it is, with only the changes needed to run on
PyTorch 2.x without CUDA, applied to the source text at import time and printed when applied (`REWRITES`):

    loss.data[0]             -> loss.item()            (indexing a 0-d tensor is an error since PyTorch 0.5)
    size(2)/2 in a slice     -> size(2)//2             (SCAN's BiGRU average: Python 3 true division)
    <expr>).cuda()           -> <expr>)                (VSE++'s unguarded `.cuda()` on the last-word index,
                                                        VSE-infinity's on the caption lengths)
    import torchvision...    -> a stand-in module      (VSE++ and SCAN import torchvision.models for the raw-image
                                                        encoder, which the precomp path never builds)

The `.cuda()` calls guarded by `torch.cuda.is_available()`, `Variable(..., volatile=False)` and the deprecated
`clip_grad_norm` still run on PyTorch 2.x and are left alone. The original model is built with its own options
(its train.py defaults plus the README / train script flags of the preset itmatch's side uses) at the sizes of
`train_step.py`: batch 128, 1024-d joint space, 300-d words, vocabulary 8,500, 36 regions x 2048-d, the synthetic
F30K captions. Then itmatch's weights are set from the original's through itmatch's own checkpoint importer, so
both sides start from the same parameters and the first step's losses must agree (printed; a check that both do
the same work). Each round times, in alternating order, the original's `model.train_emb(images, captions,
lengths, ...)` (what its train loop calls per batch: forward, loss, backward, clipping, optimizer step) and
`train_step.train_step` (the same phases as `itmatch.training` runs them), on the same batch, built outside both
timings the way each side's data loader hands it over:

* the original gets the batch sorted by caption length, longest first (its `collate_fn` does this; its
  `pack_padded_sequence` requires it) and lengths as a list;
* VSE++'s original precomp path reads one feature vector per image; it gets the mean of the 36 regions, which
  itmatch's VSE++ computes inside its image encoder (one 128 x 36 x 2048 mean, about 5 ms of its step);
* the original's `logger.update` (LogCollector, an AverageMeter per key) is a no-op stand-in here.

Medians per side over `--rounds` rounds after a warm-up round, the median of the per-round ratios, the load
average before and after.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import statistics
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step as ours  # noqa: E402
from common import add_clock_argument, chosen_clock  # noqa: E402

# (pattern, replacement, why): applied to every source file of the original that is imported
REWRITES: tuple[tuple[str, str, str], ...] = (
    (r"\.data\[0\]", ".item()", "loss.data[0] -> loss.item() (0-d tensors cannot be indexed)"),
    (r"\.size\((\d)\)/2\]", r".size(\1)//2]", "size(k)/2 -> size(k)//2 in a slice (Python 3 division)"),
    (r"\.size\((\d)\)/2:\]", r".size(\1)//2:]", "size(k)/2: -> size(k)//2: in a slice (Python 3 division)"),
    (r"^(\s*I = Variable\(.*\))\.cuda\(\)$", r"\1", "drop an unguarded .cuda() (no GPU)"),
    (r"^(\s*lengths = torch\.Tensor\(lengths\))\.cuda\(\)$", r"\1", "drop an unguarded .cuda() (no GPU)"),
)


def rewrite(source: str, name: str, log: list[str]) -> str:
    """`source` with every `REWRITES` pattern applied (multi-line mode); each change that applies is appended to
    `log` as 'name: why (n x)'."""
    for pattern, repl, why in REWRITES:
        source, n = re.subn(pattern, repl, source, flags=re.MULTILINE)
        if n:
            log.append(f"{name}: {why} ({n}x)")
    return source


class _RewritingLoader(importlib.machinery.SourceFileLoader):
    def __init__(self, fullname: str, path: str, log: list[str]) -> None:
        super().__init__(fullname, path)
        self.log = log

    def get_code(self, fullname: str) -> Any:  # never the cached bytecode: always the rewritten source
        source = Path(self.path).read_text(encoding="utf-8")
        return compile(rewrite(source, fullname, self.log), self.path, "exec")


class _OriginalFinder(importlib.abc.MetaPathFinder):
    """Finds top-level modules and packages under `root` before anything else on sys.path."""

    def __init__(self, root: Path, log: list[str]) -> None:
        self.root, self.log = root, log

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        base = self.root.joinpath(*fullname.split("."))
        if (base / "__init__.py").is_file():
            return importlib.util.spec_from_file_location(
                fullname, base / "__init__.py", loader=_RewritingLoader(fullname, str(base / "__init__.py"),
                                                                         self.log),
                submodule_search_locations=[str(base)])
        if base.with_suffix(".py").is_file():
            file = str(base.with_suffix(".py"))
            return importlib.util.spec_from_file_location(fullname, file,
                                                          loader=_RewritingLoader(fullname, file, self.log))
        return None


def import_original(root: Path, module: str, log: list[str]) -> types.ModuleType:
    """Import `module` (dotted, e.g. 'lib.vse') and what it imports from `root`, with `REWRITES` applied and a
    stand-in for torchvision when it is not installed; changes are appended to `log`."""
    wants = any("import torchvision" in f.read_text(encoding="utf-8", errors="replace") for f in root.rglob("*.py"))
    if wants and importlib.util.find_spec("torchvision") is None and "torchvision" not in sys.modules:
        stand_in = types.ModuleType("torchvision")
        stand_in.models = types.ModuleType("torchvision.models")
        sys.modules["torchvision"], sys.modules["torchvision.models"] = stand_in, stand_in.models
        log.append("torchvision: a stand-in module (only the raw-image encoder uses it; not built here)")
    finder = _OriginalFinder(root, log)
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module(module)
    finally:
        sys.meta_path.remove(finder)


class _Logger:
    def update(self, *args: Any, **kwargs: Any) -> None:
        pass


# method -> (module, class, options beyond the shared ones, max_violation at itmatch's epoch 0)
ORIGINALS = {
    "vsepp": ("model", "VSE", dict(data_name="f30k_precomp", img_dim=2048, finetune=False, cnn_type="vgg19",
                                   use_abs=False, no_imgnorm=False, measure="cosine", max_violation=True)),
    "scan_t2i": ("model", "SCAN", dict(data_name="f30k_precomp", img_dim=2048, precomp_enc_type="basic",
                                       no_imgnorm=False, no_txtnorm=False, max_violation=True, bi_gru=True,
                                       raw_feature_norm="clipped_l2norm", agg_func="LogSumExp",
                                       cross_attn="t2i", lambda_lse=6.0, lambda_softmax=9.0)),
    # train_region.sh of the bigru branch; epoch 0 is the VSE0 warm-up epoch (vse_mean_warmup_epochs=1)
    "vse_inf_bigru": ("lib.vse", "VSEModel", dict(data_name="f30k", img_dim=2048, precomp_enc_type="basic",
                                                  no_imgnorm=False, no_txtnorm=False, max_violation=False,
                                                  optim="adam", learning_rate=5e-4, backbone_source="detector",
                                                  backbone_path="", backbone_lr_factor=0.01)),
}
SHARED = dict(embed_size=1024, word_dim=300, num_layers=1, margin=0.2, grad_clip=2.0, learning_rate=2e-4,
              vocab_size=ours.VOCAB)


def original_batch(method: str, batch: Any) -> tuple[tuple, dict]:
    """The arguments of the original's `train_emb` for `batch`, as its data loader hands them over."""
    order = torch.argsort(batch.lengths, descending=True, stable=True)
    images = batch.images[order]
    lengths = batch.lengths[order]
    captions = batch.captions[order][:, : int(lengths.max())].contiguous()
    if method == "vsepp":
        images = images.mean(dim=1)
    kwargs = {}
    if method == "vse_inf_bigru":
        kwargs["image_lengths"] = batch.image_lengths[order]
    return (images.contiguous(), captions, [int(n) for n in lengths]), kwargs


def same_order(method: str, batch: Any) -> Any:
    """`batch` reordered like `original_batch` (so both sides see the same pairs in the same order)."""
    import dataclasses

    order = torch.argsort(batch.lengths, descending=True, stable=True)
    changes = {"images": batch.images[order], "captions": batch.captions[order], "lengths": batch.lengths[order]}
    if batch.image_lengths is not None:
        changes["image_lengths"] = batch.image_lengths[order]
    return dataclasses.replace(batch, **changes)


def build_original(root: Path, method: str, log: list[str]) -> Any:
    module, cls, options = ORIGINALS[method]
    mod = import_original(root, module, log)
    opt = argparse.Namespace(**(SHARED | options))
    torch.manual_seed(0)
    model = getattr(mod, cls)(opt)
    model.logger = _Logger()
    model.train_start()
    return model, opt


def record_losses(model: Any) -> list[float]:
    """Wrap the original's `forward_loss` (on the instance) so that each step's loss is appended to the list."""
    seen: list[float] = []
    forward_loss = model.forward_loss

    def recorded(*args: Any, **kwargs: Any) -> Any:
        loss = forward_loss(*args, **kwargs)
        seen.append(float(loss.detach()))
        return loss

    model.forward_loss = recorded
    return seen


def copy_weights(original: Any, opt: argparse.Namespace, setup: Any) -> str:
    """Load the original's initial weights into itmatch's model through itmatch's importer; what happened."""
    from itmatch.registry import method_spec

    ckpt = {"opt": opt, "model": original.state_dict(), "epoch": 0}
    spec = method_spec(setup.model.cfg.name)
    for importer in spec.importers:
        if importer.detect(ckpt):
            _, state = importer.convert(ckpt)
            missing, unexpected = setup.model.load_state_dict(state, strict=False)
            return f"weights copied through {spec.name}'s importer (missing {list(missing)}, unexpected " \
                   f"{list(unexpected)})"
    return "no importer recognised the original's state dict: the two sides start from different weights"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--original", required=True, type=Path, help="a checkout of the original repository")
    ap.add_argument("--method", required=True, choices=sorted(ORIGINALS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    add_clock_argument(ap)
    args = ap.parse_args()
    ours.CLOCK = chosen_clock(ap, args)
    if not (args.original / ORIGINALS[args.method][0].replace(".", "/")).with_suffix(".py").is_file():
        ap.error(f"{args.original} has no {ORIGINALS[args.method][0].replace('.', '/')}.py")
    clock = ours.CLOCK
    log: list[str] = []
    original, opt = build_original(args.original.resolve(), args.method, log)
    seen = record_losses(original)
    for line in log:
        print(f"change to the original: {line}")
    with tempfile.TemporaryDirectory(prefix="itmatch_original_step_") as tmp:
        data = ours.write_data(Path(tmp), args.batch)
        setup = ours.build(args.method, data, None, args.batch)
        print(copy_weights(original, opt, setup))
        batch = same_order(args.method, setup.source[0])
        o_args, o_kwargs = original_batch(args.method, batch)
        print(f"batch {args.batch}, images {tuple(batch.images.shape)}, captions {tuple(batch.captions.shape)} "
              f"(mean length {batch.lengths.float().mean():.1f}), original images {tuple(o_args[0].shape)}; "
              f"threads {torch.get_num_threads()}, clock {args.clock}")
        load0 = os.getloadavg()[0]
        times: dict[str, list[float]] = {"original": [], "itmatch": []}
        ratios = []
        for rnd in range(args.rounds + 1):
            got = {}
            for side in (("original", "itmatch") if rnd % 2 == 0 else ("itmatch", "original")):
                t0 = clock()
                if side == "original":
                    original.train_emb(*o_args, **o_kwargs)
                else:
                    loss = ours.train_step(setup, batch, rnd)
                got[side] = clock() - t0
            if rnd == 0:  # the warm-up round: the first step of both, from the same weights
                print(f"first-step loss: original {seen[-1]:.6f}, itmatch {float(loss):.6f}")
                continue
            for side, t in got.items():
                times[side].append(t)
            ratios.append(got["original"] / got["itmatch"])
            print(f"round {rnd}: original {got['original']:.3f} s, itmatch {got['itmatch']:.3f} s", flush=True)
        mo, mi = statistics.median(times["original"]), statistics.median(times["itmatch"])
        print(f"{args.method}: original {mo:.3f} s, itmatch {mi:.3f} s (medians of {args.rounds}), "
              f"ratio median {statistics.median(ratios):.2f}x; load {load0:.2f} -> {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
