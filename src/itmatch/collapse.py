"""Hardest-negative collapse: its signals, and the training loop's guard against it (`train.collapse_guard`).

With VSE++'s hardest negatives (`train.max_violation`) from a weak start, every embedding can fall onto one
point: all similarities become equal, each image's hardest caption and each caption's hardest image then violate
the margin by exactly `margin`, and the hinge loss stays pinned at its collapse value 2 * B * margin (B = batch),
with every negative violating and no spread left in the scores; dev recall sits at chance. Nothing moves it out.

`collapse_signals` reads those signals off one batch's similarity matrix (pure function). `CollapseGuard` counts
consecutive collapsed batches while hardest negatives are on, and checks dev recall against chance at the end of
every epoch that used them:

- "warn" logs one line per signal naming it and the fix, and changes no number;
- "fallback" also switches the recipe to the VSE0 loss (sum over all negatives) for one epoch's worth of steps,
  then retries hardest negatives (at most `MAX_FALLBACKS` times; after that it keeps VSE0). Each switch is a
  TensorBoard scalar (train/hardest_negatives) and an entry of the run's history, and the guard's state travels
  in resumable checkpoints, so a resumed run replays the same switches;
- "off" computes nothing.
"""

from __future__ import annotations

import logging
from math import comb
from typing import Any

import torch

from itmatch.losses import hinge_loss

_logger = logging.getLogger(__name__)

MODES = ("warn", "fallback", "off")
MAX_FALLBACKS = 3
# A batch is "collapsed" when its hardest-negative loss is within PINNED_TOL of 2 * B * margin, at least
# VIOLATING_MIN of its negatives violate the margin, and its similarities spread less than SPREAD_MAX * margin.
PINNED_TOL = 0.05
VIOLATING_MIN = 0.95
SPREAD_MAX = 0.1
MIN_DEV_IMAGES = 50  # fewer dev images: chance rsum is too high and too noisy to tell (10 images: 281 of 600)
CHANCE_FACTOR = 1.5  # dev rsum below this many times the chance rsum after hardest negatives: at chance
FIX = ("lengthen the VSE0 warm-up (model.vse_mean_warmup_epochs, where the method has one), lower train.lr or set "
       "train.max_violation=false; train.collapse_guard=fallback switches to VSE0 by itself")


def collapse_value(batch: int, margin: float) -> float:
    """The hardest-negative hinge loss (`hinge_loss(max_violation=True)`) when all B x B similarities are equal:
    each of the B rows and B columns contributes margin + s - s = margin."""
    return 2.0 * batch * margin


def collapse_signals(sims: torch.Tensor, margin: float) -> dict[str, float]:
    """One batch's collapse signals from its (B, B) similarities (diagonal = positive pairs), no gradient:
    `pinned` the hardest-negative loss over its collapse value (1.0 = collapsed), `violating` the fraction of the
    2 B (B - 1) negatives (both directions) within the margin of their positive, `spread` the standard deviation
    of all B x B similarities."""
    with torch.no_grad():
        sims = sims.detach().float()
        b = len(sims)
        pos = sims.diagonal()
        off = ~torch.eye(b, dtype=torch.bool, device=sims.device)
        violating = ((margin + sims - pos[:, None] > 0) & off).sum() + ((margin + sims - pos[None, :] > 0) & off).sum()
        hardest = hinge_loss(sims, margin=margin, max_violation=True)
        return {"pinned": float(hardest) / collapse_value(b, margin),
                "violating": float(violating) / max(2 * b * (b - 1), 1),
                "spread": float(sims.std()) if sims.numel() > 1 else 0.0}


def is_collapsed(signals: dict[str, float], margin: float) -> bool:
    return (abs(signals["pinned"] - 1.0) < PINNED_TOL and signals["violating"] >= VIOLATING_MIN
            and signals["spread"] < SPREAD_MAX * margin)


def chance_rsum(n_images: int, captions_per_image: int = 5, ks: tuple[int, ...] = (1, 5, 10)) -> float:
    """Expected rsum of a random ranking: t2i R@K = K / n; i2t R@K = 1 - C(N - c, K) / C(N, K), the chance that one of
    the c ground-truth captions is among K of N = c n captions drawn at random."""
    n_cap = captions_per_image * n_images
    t2i = sum(min(k, n_images) / n_images for k in ks)
    i2t = sum(1 - comb(n_cap - captions_per_image, k) / comb(n_cap, k) for k in ks)
    return 100.0 * (t2i + i2t)


class CollapseGuard:
    """The training loop's watch over hardest-negative collapse (see the module docstring)."""

    def __init__(self, mode: str, margin: float, patience: int) -> None:
        if mode not in MODES:
            raise ValueError(f"collapse_guard must be one of {MODES}, got {mode!r}")
        self.mode, self.margin, self.patience = mode, margin, max(int(patience), 1)
        self.streak = 0  # consecutive collapsed batches
        self.fallback_until = -1  # global step until which the recipe uses VSE0 (exclusive)
        self.fallbacks = 0
        self.warned: list[str] = []
        self.hard_in_epoch = False  # hardest negatives were on in some step of the epoch in progress

    @property
    def active(self) -> bool:
        return self.mode != "off"

    def vse0(self, global_step: int) -> bool:
        """Whether the step starting at `global_step` (0-based count of steps done) falls back to VSE0."""
        return self.mode == "fallback" and (global_step < self.fallback_until or self.fallbacks > MAX_FALLBACKS)

    def observe_step(self, signals: dict[str, float] | None, global_step: int, steps_per_epoch: int) -> str | None:
        """Signals of the step that just ended (None: hardest negatives were off); returns an event or None."""
        if not self.active or signals is None:
            return None
        self.hard_in_epoch = True
        self.streak = self.streak + 1 if is_collapsed(signals, self.margin) else 0
        if self.streak < self.patience:
            return None
        self.streak = 0
        why = (f"the hardest-negative loss has sat at its collapse value 2*B*margin for {self.patience} steps "
               f"(last batch: {100 * signals['violating']:.0f}% of negatives violating the margin, similarity "
               f"spread {signals['spread']:.4f})")
        return self._fire("loss_pinned", why, global_step, steps_per_epoch)

    def observe_epoch(self, rsum: float, n_images: int, global_step: int, steps_per_epoch: int) -> str | None:
        """Dev results at the end of an epoch; fires when hardest negatives were on and dev rsum is at chance."""
        hard, self.hard_in_epoch = self.hard_in_epoch, False
        if not self.active or not hard or n_images < MIN_DEV_IMAGES:
            return None
        chance = chance_rsum(n_images)
        if rsum >= CHANCE_FACTOR * chance:
            return None
        why = f"dev rsum {rsum:.1f} is at chance ({chance:.1f} for {n_images} images) after hardest negatives"
        return self._fire("dev_at_chance", why, global_step, steps_per_epoch)

    def _fire(self, signal: str, why: str, global_step: int, steps_per_epoch: int) -> str | None:
        if self.mode == "warn":
            if signal not in self.warned:
                self.warned.append(signal)
                _logger.warning("possible hardest-negative collapse at step %d: %s; %s", global_step, why, FIX)
            return None
        if global_step < self.fallback_until:
            return None
        self.fallbacks += 1
        if self.fallbacks > MAX_FALLBACKS:
            _logger.warning("hardest-negative collapse again at step %d (%s): %d fallbacks done, keeping the VSE0 "
                            "loss for the rest of the run", global_step, why, MAX_FALLBACKS)
            return f"collapse:{signal}:vse0_for_good"
        self.fallback_until = global_step + max(steps_per_epoch, 1)
        _logger.warning("hardest-negative collapse at step %d: %s; falling back to the VSE0 loss until step %d, "
                        "then retrying hardest negatives (fallback %d of %d)", global_step, why,
                        self.fallback_until, self.fallbacks, MAX_FALLBACKS)
        return f"collapse:{signal}:vse0_until_{self.fallback_until}"

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self.streak, "fallback_until": self.fallback_until, "fallbacks": self.fallbacks,
                "warned": list(self.warned), "hard_in_epoch": self.hard_in_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak, self.fallback_until = int(state["streak"]), int(state["fallback_until"])
        self.fallbacks, self.warned = int(state["fallbacks"]), list(state["warned"])
        self.hard_in_epoch = bool(state["hard_in_epoch"])
