"""One training loop for every method: deterministic, resumable, atomic checkpoints, TensorBoard scalars.

`fit` never prints or parses argv; progress goes through tqdm (when asked) and the `on_step` callback, numbers
come back as a dict. Determinism: the batch order of epoch e is a permutation drawn from a generator seeded with
(seed, e), so a run resumed from any checkpoint (mid-epoch ones included) replays exactly the batches, parameters
and optimizer state of an uninterrupted run, bit for bit on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from itmatch import distributed
from itmatch.checkpoints import native
from itmatch.collapse import CollapseGuard
from itmatch.config import Config, config_from_dict, config_to_dict
from itmatch.data.augment import AugmentedCaptions
from itmatch.data.images import ImageSplit
from itmatch.data.precomp import Batch, CaptionDataset, PrecompSplit, find_vocab, resolve_root
from itmatch.data.tokenize import CaptionTokenizer, text_tokenizer, uses_vocab, vocab_words
from itmatch.data.vocab import load_vocab
from itmatch.device import check_device
from itmatch.errors import ConfigError, DataError, TrainingError
from itmatch.evaluation import evaluate_sims
from itmatch.inference import compute_fold_sims, compute_sims
from itmatch.method import SplitInputs
from itmatch.models.base import RetrievalModel
from itmatch.provenance import provenance
from itmatch.recipe import Recipe
from itmatch.registry import create_model, method_spec

_logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
BEST = "model_best.pt"


@dataclasses.dataclass
class RunState:
    epoch: int = 0  # epoch in progress (0-based)
    step_in_epoch: int = 0  # batches of `epoch` already done
    global_step: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1
    train_seconds: float = 0.0  # wall time spent training, summed over resumed sessions


def open_split(cfg: Config, root: Path, split: str, *, max_images: int = 0,
               threads: bool = True) -> PrecompSplit | ImageSplit:
    """A split of the dataset at `root`: features, or raw images prepared for `cfg.model`'s backbone
    (`threads`: decode batches in `data.workers` threads; off where DataLoader workers already parallelise)."""
    dc = cfg.data
    normalisation = method_spec(cfg.model.name).pixels(cfg.model)
    if dc.source == "features":
        if normalisation is not None:
            raise ConfigError(f"this {cfg.model.name} model reads raw images (model.backbone); add "
                              "--set data.source=images")
        return PrecompSplit(root, split, max_images=max_images)
    if normalisation is None:
        raise ConfigError(f"data.source='images' needs a model with a CNN (model.backbone); {cfg.model.name} has "
                          "none set")
    return ImageSplit(root, split, input_scale_factor=dc.input_scale_factor, image_dir=dc.image_dir,
                      normalisation=normalisation, workers=dc.workers if threads else 0,
                      skip_bad=dc.skip_bad_images, max_images=max_images)


def resolve_config(cfg: Config) -> tuple[Config, PrecompSplit | ImageSplit, CaptionTokenizer]:
    """Open the training split and the model's tokenizer and fill in the data-dependent model fields."""
    if not cfg.data.path:
        raise ConfigError("no dataset: pass --data DIR or --set data.path=DIR")
    root = resolve_root(cfg.data.path, cfg.data.train_split)
    split = open_split(cfg, root, cfg.data.train_split, max_images=cfg.data.train_images,
                       threads=cfg.data.workers == 0)
    vocab = load_vocab(find_vocab(root, cfg.data.vocab)) if uses_vocab(cfg.model) else None
    tokenizer = text_tokenizer(cfg.model, vocab)
    image_dim = split.feature_dim if isinstance(split, PrecompSplit) else None
    try:
        model_cfg = method_spec(cfg.model.name).complete(cfg.model, image_dim=image_dim, vocab_size=len(tokenizer))
    except ConfigError as err:
        raise ConfigError(f"{err} ({split.images.path})") from None
    data_cfg = dataclasses.replace(cfg.data, path=str(root))
    return dataclasses.replace(cfg, model=model_cfg, data=data_cfg), split, tokenizer


def build_model(cfg: Config, device: torch.device | str = "cpu") -> RetrievalModel:
    """The model of a resolved config (`resolve_config`), on `device`."""
    return create_model(cfg.model, device=device)


def build_recipe(model: RetrievalModel, cfg: Config,
                 collective: distributed.Collective | None = None) -> Recipe:
    """The method's training recipe for `model` (built right after it: training-only modules draw their initial
    weights after the model's); `collective` is torchrun's process group (default: one process)."""
    make = method_spec(cfg.model.name).recipe or Recipe
    return make(model, cfg, collective)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a permutation seeded by (seed, epoch), cut into batch_size chunks."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen).tolist()
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


class _Batches(torch.utils.data.Dataset):
    """Item i = the i-th batch, read with one fancy-indexed copy (works with DataLoader workers).

    With augmentation, batch i draws from a generator seeded by `key + (i,)` ((seed, epoch, step in epoch)), so a
    resumed run draws exactly what the uninterrupted run drew.
    """

    def __init__(self, dataset: CaptionDataset, batches: list[list[int]], augment: AugmentedCaptions | None = None,
                 key: tuple[int, ...] = ()) -> None:
        self.dataset, self.batches, self.augment, self.key = dataset, batches, augment, key

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Batch:
        rng = np.random.default_rng([*self.key[:-1], self.key[-1] + i])
        if self.augment is None:
            return self.dataset.batch(self.batches[i], rng)
        return self.augment.batch(self.batches[i], rng)


def _one_line_errors(batches: Iterable[Batch]) -> Iterator[Batch]:
    """Batches, with a DataLoader worker's error reduced to its own one-line message (the re-raised copy carries
    the worker's traceback in its text)."""
    try:
        yield from batches
    except DataError as err:
        lines = str(err).strip().splitlines()
        if len(lines) == 1:
            raise
        raise DataError(lines[-1].split(": ", 1)[-1]) from None


class _TrainingLoss(torch.nn.Module):
    """The recipe's loss as a module's forward, over the model and the recipe's training-only modules (in that
    order: the gradient clip's), so that DistributedDataParallel sees (and syncs) the call and every weight."""

    def __init__(self, recipe: Recipe) -> None:
        super().__init__()
        self.model = recipe.model
        self.extra = torch.nn.ModuleDict(recipe.modules())
        self.recipe = recipe

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return self.recipe.loss(*args, **kwargs)


class _NoWriter:
    """TensorBoard stand-in for the ranks other than 0 (only rank 0 writes logs)."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _rank_batches(batches: list[list[int]], info: distributed.DistInfo) -> list[list[int]]:
    """Every rank's shard of each global batch; a final batch smaller than the world size is dropped."""
    if not info.enabled:
        return batches
    return [distributed.shard(b, info.rank, info.world_size) for b in batches if len(b) >= info.world_size]


def evaluate_model(model: RetrievalModel, split: PrecompSplit | ImageSplit, vocab: CaptionTokenizer, *,
                   batch_size: int = 128, device: torch.device | str = "cpu", fold5: bool = False) -> dict:
    """Encode a split and run the retrieval protocol on it."""
    scorer = compute_fold_sims if fold5 else compute_sims  # fold-5: only the diagonal blocks are scored
    return evaluate_sims(scorer(model, split, vocab, batch_size=batch_size, device=device), fold5=fold5)


def _set_lr(optimizer: torch.optim.Optimizer, base_lrs: list[float], epoch: int, lr_update: int,
            milestones: tuple[int, ...] = ()) -> float:
    """lr = base * 0.1 ** (epoch // lr_update), or 0.1 ** (milestones reached) when milestones are given."""
    if milestones:
        factor = 0.1 ** sum(epoch >= m for m in milestones)
    else:
        factor = 0.1 ** (epoch // lr_update) if lr_update > 0 else 1.0
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base * factor
    return optimizer.param_groups[0]["lr"]


def _checkpoint(model: RetrievalModel, recipe: Recipe, optimizer: torch.optim.Optimizer | None, cfg: Config,
                vocab: CaptionTokenizer, state: RunState, history: list[dict],
                guard: CollapseGuard | None = None, prov: dict | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "config": config_to_dict(cfg),
        "provenance": prov,
        "model": model.state_dict(),
        "vocab": vocab_words(vocab),
        "state": dataclasses.asdict(state),
        "history": history,
        "rng_torch": torch.get_rng_state(),
    }
    if optimizer is not None:
        out["optimizer"] = optimizer.state_dict()
        out["training_state"] = recipe.state_dict()
        if guard is not None:
            out["collapse_guard"] = guard.state_dict()
    return out


def fit(cfg: Config, out_dir: str | Path, *, resume: bool = False, progress: bool = False,
        on_step: Callable[[RunState, dict[str, float]], None] | None = None,
        on_epoch: Callable[[RunState, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train `cfg` into `out_dir` (checkpoint.pt, model_best.pt, config.json, tb/); returns a summary.

    `on_epoch(state, info)` is called after each epoch's dev evaluation (rank 0) with info = {"epoch", "epochs",
    "rsum", "best" (this epoch is the best so far), "loss" (mean over the epoch's steps of this session), "seconds"
    (training time so far, resumed sessions included), "hardest_negatives"}: the CLI prints it as one plain line
    where no progress bar can be drawn.

    Under `torchrun` every rank calls `fit` with the same arguments: `data.batch_size` is the global batch, each
    rank encodes its contiguous shard, and only rank 0 validates and writes logs and checkpoints.
    """
    check_device(cfg.train.device, "train.device")
    joined = not distributed.active()
    info, device = distributed.setup(cfg.train.device)
    joined = joined and info.enabled  # tear down only a process group this call created
    try:
        return _fit(cfg, Path(out_dir), info, device, resume=resume, progress=progress, on_step=on_step,
                    on_epoch=on_epoch)
    finally:
        if joined:
            distributed.teardown()


def _fit(cfg: Config, out: Path, info: distributed.DistInfo, device: torch.device, *, resume: bool,
         progress: bool, on_step: Callable[[RunState, dict[str, float]], None] | None,
         on_epoch: Callable[[RunState, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    ckpt_path = out / CHECKPOINT
    for stale in (*out.glob(f".{CHECKPOINT}.*.tmp"), *out.glob(f".{BEST}.*.tmp")):  # left by a killed write
        if info.is_main:
            stale.unlink(missing_ok=True)
    saved = None
    if resume:
        saved = native.load(ckpt_path)
        cfg = config_from_dict(saved["config"], str(ckpt_path))
    cfg, train_split, vocab = resolve_config(cfg)
    tc, dc = cfg.train, cfg.data
    spec = method_spec(cfg.model.name)
    torch.manual_seed(tc.seed)
    model = create_model(cfg.model, device=device)
    recipe = build_recipe(model, cfg, distributed.Collective())
    if tc.region_drop and not spec.region_drop:
        raise ConfigError(f"train.region_drop needs a model that takes image lengths; {cfg.model.name} does not")
    if info.enabled and not recipe.trains_distributed:
        raise ConfigError(f"{cfg.model.name}'s training loss reads more than its recipe gathers across processes; "
                          "train it in one process (without torchrun)")
    refusal = spec.ddp_refusal(cfg.model) if info.enabled else None
    if refusal:
        raise ConfigError(refusal)
    if tc.amp == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs a GPU (train.device=cuda); on CPU use train.amp=bf16 or none")
    optimizer = recipe.optimizer(tc.lr)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    state, history = RunState(), []
    guard = CollapseGuard(tc.collapse_guard, tc.margin, tc.collapse_patience)
    if saved is not None:
        model.load_state_dict(saved["model"])
        recipe.load_state_dict(saved.get("training_state", {}))
        optimizer.load_state_dict(saved["optimizer"])
        state = RunState(**saved["state"])
        history = list(saved["history"])
        if "collapse_guard" in saved:
            guard.load_state_dict(saved["collapse_guard"])
        torch.set_rng_state(saved["rng_torch"])  # rank 0's; the other ranks reseed below
        _logger.info("resumed from %s at epoch %d step %d", ckpt_path, state.epoch, state.step_in_epoch)
    elif ckpt_path.exists():
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n", encoding="utf-8")
    if info.enabled:
        torch.manual_seed(tc.seed * 1_000_003 + 7919 * info.rank + state.global_step)  # own dropout masks per rank
    loss_module = _TrainingLoss(recipe)
    trainer: torch.nn.Module = loss_module
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # Broadcasts rank 0's weights. Every trainable weight takes part in the loss (BERT's pooler, which would
        # not, is frozen), so DDP needs no search for unused parameters.
        trainer = DistributedDataParallel(trainer, device_ids=[device.index] if device.type == "cuda" else None)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=tc.amp == "fp16")

    perm = None
    if dc.shuffle_captions:
        perm = np.random.default_rng(tc.seed).permutation(train_split.n_captions)
    provider = spec.inputs(cfg.model)  # the method's extra inputs (GSMN: boxes, dependency pairs, its token ids)
    found = provider.for_split(train_split) if provider is not None else SplitInputs()
    dataset = CaptionDataset(train_split, vocab, caption_perm=perm, tokens=found.token_ids,
                             image_inputs=found.images, caption_inputs=found.captions)
    augment = None
    if tc.region_drop or tc.word_noise:
        augment = AugmentedCaptions(dataset, vocab, region_drop=tc.region_drop, word_noise=tc.word_noise)
    val_split = open_split(cfg, Path(dc.path), dc.val_split)
    if isinstance(train_split, PrecompSplit) and isinstance(val_split, PrecompSplit) and (
            val_split.images.shape[1:] != train_split.images.shape[1:]):
        raise DataError(f"{val_split.images.path} has features of shape {val_split.images.shape[1:]} per image but "
                        f"{train_split.images.path} has {train_split.images.shape[1:]}; every split of a dataset "
                        "needs the same regions and dimension (`itmatch data check` lists them)")
    if dc.val_split == dc.test_split:
        _logger.warning("model selection on the test split %r (data.val_split): the reported test numbers are then "
                        "optimistic; HREM's original does this, use the dev split for a clean protocol", dc.val_split)

    if info.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer: Any = SummaryWriter(str(out / "tb"), purge_step=state.global_step or None)
    else:
        writer = _NoWriter()
    started, seconds_before = time.perf_counter(), state.train_seconds
    prov = None
    if info.is_main:  # the code, libraries, machine, training split's files and config behind these weights
        prov = provenance(config=cfg, data_root=resolve_root(dc.path, dc.train_split), split=dc.train_split,
                          n_images=train_split.n_images, n_captions=train_split.n_captions, device=str(device),
                          dtype=tc.amp or "float32")

    def save_resumable() -> None:
        state.train_seconds = seconds_before + time.perf_counter() - started
        if info.is_main:
            native.save(_checkpoint(model, recipe, optimizer, cfg, vocab, state, history, guard, prov), ckpt_path)

    def save_best() -> None:
        if info.is_main:
            native.save(_checkpoint(model, recipe, None, cfg, vocab, state, history, prov=prov), out / BEST)

    def validate() -> dict | None:
        """Dev results on rank 0 (the others wait); None on the other ranks."""
        res = evaluate_model(model, val_split, vocab, batch_size=dc.batch_size, device=device) if info.is_main else None
        distributed.barrier()
        return res

    stop = False
    try:
        while state.epoch < tc.epochs and not stop:
            lr = _set_lr(optimizer, base_lrs, state.epoch, tc.lr_update, tc.lr_milestones)
            recipe.on_epoch_start(state.epoch)
            batches = _rank_batches(epoch_batches(len(dataset), dc.batch_size, tc.seed, state.epoch), info)
            # Its own generator: starting an iterator draws a seed, which from the global RNG would shift the
            # dropout masks of a run resumed mid-epoch (VSRN's caption branch).
            loader = torch.utils.data.DataLoader(
                _Batches(dataset, batches[state.step_in_epoch :], augment, (tc.seed, state.epoch, state.step_in_epoch)),
                batch_size=None, shuffle=False, num_workers=dc.workers,
                prefetch_factor=dc.prefetch if dc.workers else None,
                generator=torch.Generator().manual_seed(tc.seed * 1_000_003 + state.epoch),
            )
            loss_module.train()
            loss_sum, loss_steps = 0.0, 0
            bar = tqdm(_one_line_errors(loader), total=len(loader), desc=f"epoch {state.epoch + 1}/{tc.epochs}",
                       disable=not (progress and info.is_main), leave=False)
            for batch in bar:
                batch = batch.to(device)
                recipe.on_step_start(state.step_in_epoch, len(batches))
                recipe.vse0_fallback = guard.vse0(state.global_step)
                extra: dict[str, Any] = {}
                if batch.image_lengths is not None:
                    extra["image_lengths"] = batch.image_lengths
                extra |= batch.inputs | batch.extras(recipe.batch_inputs)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    terms = trainer(batch.images, batch.captions, batch.lengths, epoch=state.epoch, **extra)
                loss = terms["loss"].float()
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"loss became {loss.item()} at epoch {state.epoch + 1} step {state.global_step + 1}; "
                        f"the last good checkpoint ({ckpt_path if ckpt_path.exists() else 'none yet'}) is kept; "
                        "lower train.lr or check the features for NaN/inf (`itmatch data check`)"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if tc.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    norm = torch.nn.utils.clip_grad_norm_(loss_module.parameters(), tc.grad_clip)
                elif not scaler.is_enabled():
                    norm = torch.nn.utils.get_total_norm([p.grad for p in loss_module.parameters()
                                                          if p.grad is not None])
                if not scaler.is_enabled() and not torch.isfinite(norm):  # fp16 scaling skips such steps itself
                    raise TrainingError(
                        f"the gradients became {norm.item()} at epoch {state.epoch + 1} step {state.global_step + 1} "
                        f"(the loss was {loss.item():.4g}); the step is not taken and the last good checkpoint "
                        f"({ckpt_path if ckpt_path.exists() else 'none yet'}) is kept; lower train.lr or check the "
                        "features for NaN/inf (`itmatch data check`)")
                scaler.step(optimizer)
                scaler.update()
                state.step_in_epoch += 1
                state.global_step += 1
                stats = {k: float(v.detach()) for k, v in terms.items()}
                loss_sum, loss_steps = loss_sum + stats["loss"], loss_steps + 1
                signals, recipe.collapse_signals = recipe.collapse_signals, None
                event = guard.observe_step(signals, state.global_step, len(batches))
                if guard.active and recipe.max_violation:
                    writer.add_scalar("train/hardest_negatives", float(recipe.hardest_negatives), state.global_step)
                    if signals is not None:
                        for k, v in signals.items():
                            writer.add_scalar(f"collapse/{k}", v, state.global_step)
                if event is not None:
                    history.append({"epoch": state.epoch + 1, "step": state.global_step, "event": event})
                if state.global_step % max(tc.log_every, 1) == 0:
                    for k, v in stats.items():
                        writer.add_scalar(f"train/{k}", v, state.global_step)
                    writer.add_scalar("train/lr", lr, state.global_step)
                    bar.set_postfix(loss=f"{stats['loss']:.3f}")
                if on_step is not None:
                    on_step(state, stats)
                if tc.val_every and state.global_step % tc.val_every == 0:
                    res = validate()
                    if res is not None:
                        writer.add_scalar("val/rsum", res["rsum"], state.global_step)
                        if tc.val_selects and recipe.selection_score(res) > state.best_score:
                            state.best_score, state.best_epoch = recipe.selection_score(res), state.epoch + 1
                            save_best()
                if tc.save_every and state.global_step % tc.save_every == 0:
                    save_resumable()
                if tc.max_steps and state.global_step >= tc.max_steps:
                    stop = True
                    break
            if stop and state.step_in_epoch < len(batches):
                save_resumable()
                break
            # End of epoch: validate, select by the method's criterion (strictly better, as upstream), save.
            res = validate()
            state.epoch += 1
            state.step_in_epoch = 0
            if res is not None:
                score = recipe.selection_score(res)
                for direction in ("i2t", "t2i"):
                    for k, v in res[direction].items():
                        writer.add_scalar(f"val/{direction}_{k}", v, state.global_step)
                writer.add_scalar("val/rsum", res["rsum"], state.global_step)
                history.append({"epoch": state.epoch, "step": state.global_step, "rsum": res["rsum"],
                                "score": score, "i2t_R@1": res["i2t"]["R@1"], "t2i_R@1": res["t2i"]["R@1"]})
                event = guard.observe_epoch(res["rsum"], val_split.n_images, state.global_step, len(batches))
                if event is not None:
                    history.append({"epoch": state.epoch, "step": state.global_step, "event": event})
                if score > state.best_score:
                    state.best_score, state.best_epoch = score, state.epoch
                    save_best()
                _logger.info("epoch %d: dev rsum %.2f%s", state.epoch, res["rsum"],
                             " (best)" if state.best_epoch == state.epoch else "")
                if on_epoch is not None:
                    on_epoch(state, {"epoch": state.epoch, "epochs": tc.epochs, "rsum": res["rsum"],
                                     "best": state.best_epoch == state.epoch,
                                     "loss": loss_sum / max(loss_steps, 1),
                                     "seconds": seconds_before + time.perf_counter() - started,
                                     "hardest_negatives": recipe.hardest_negatives})
            save_resumable()
    finally:
        writer.close()
    total = seconds_before + time.perf_counter() - started
    return {"out_dir": str(out), "epochs": state.epoch, "steps": state.global_step, "best_score": state.best_score,
            "best_epoch": state.best_epoch, "train_seconds": total, "history": history, "config": config_to_dict(cfg)}
