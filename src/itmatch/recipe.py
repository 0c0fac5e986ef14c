"""How a method trains, kept apart from its `nn.Module`: loss, negative schedule and warm-ups, optimizer groups,
selection criterion and training-only modules and state.

The training loop (`itmatch.train`) builds one `Recipe` per run from the method's spec, right after the model (so
training-only modules draw their initial weights after the model's, as the originals), and calls it; models only
encode and score. `gather` is the loop's all-gather for torchrun: a dot-product method mines negatives over the
global batch by gathering its pooled embeddings (identity in one process).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from itmatch.collapse import collapse_signals
from itmatch.errors import CheckpointError
from itmatch.losses import hinge_loss
from itmatch.models.base import Encoded, RetrievalModel


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class Recipe:
    """The default recipe, VSE++'s: bidirectional hinge loss (hardest negative when `train.max_violation`), Adam over
    every trainable weight, model selection on dev rsum; no warm-ups, no training-only modules."""

    # Batch fields the loss takes besides images, captions and lengths (HREM: "image_ids", to group captions).
    batch_inputs: tuple[str, ...] = ()
    # Whether the loss sees only pooled embeddings, so that torchrun training (embeddings all-gathered with
    # gradients) equals one process on the concatenated batch. Cross-attention models never do.
    distributed: bool = True

    def __init__(self, model: RetrievalModel, config: Any,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.model, self.config = model, config
        self.margin = config.train.margin
        self.max_violation = config.train.max_violation
        self.gather = gather or _identity
        # Set by the training loop's collapse guard (`itmatch.collapse`): VSE0 in place of hardest negatives.
        self.vse0_fallback = False
        self.watch_collapse = getattr(config.train, "collapse_guard", "off") != "off"
        self.collapse_signals: dict[str, float] | None = None  # the last hardest-negative batch's, for the guard

    @property
    def trains_distributed(self) -> bool:
        return self.distributed and self.model.is_embedding_model()

    def modules(self) -> dict[str, nn.Module]:
        """Training-only modules (trained with the model, saved in resumable checkpoints only)."""
        return {}

    def parameters(self) -> list[nn.Parameter]:
        """Every trainable weight: the model's, then the training-only modules' (the gradient clip's order)."""
        params = [p for p in self.model.parameters()]
        for module in self.modules().values():
            params += list(module.parameters())
        return params

    def loss(self, images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, *, epoch: int,
             image_lengths: torch.Tensor | None = None, **inputs: Any) -> dict[str, torch.Tensor]:
        """Loss terms for one batch (pairs on the diagonal); key "loss" is what is minimised.

        `image_lengths` (B,) counts the valid regions when training drops regions (`train.region_drop`); `inputs`
        are the model's extra encoder inputs (`MethodSpec.inputs`) and this recipe's `batch_inputs`.
        """
        sims = self.similarity(images, captions, lengths, image_lengths=image_lengths, **inputs)
        return {"loss": self.hinge(sims)}

    @property
    def hardest_negatives(self) -> bool:
        """Whether the hinge loss uses the hardest negative now (`max_violation`, unless the guard fell back)."""
        return self.max_violation and not self.vse0_fallback

    def hinge(self, sims: torch.Tensor) -> torch.Tensor:
        """The hinge loss of a batch's similarities, hardest negative or VSE0 as `hardest_negatives` says; with
        hardest negatives on, it leaves the batch's collapse signals for the loop's guard (no gradient, no RNG)."""
        hardest = self.hardest_negatives
        if hardest and self.watch_collapse:
            self.collapse_signals = collapse_signals(sims, self.margin)
        return hinge_loss(sims, margin=self.margin, max_violation=hardest)

    def similarity(self, images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, *,
                   image_lengths: torch.Tensor | None = None, **inputs: Any) -> torch.Tensor:
        """The batch's (B, B) similarities with gradients; pooled embeddings are gathered over the global batch."""
        image_inputs, text_inputs = split_inputs(self.model, inputs)
        if image_lengths is not None:
            image_inputs["lengths"] = image_lengths
        encoded = self.model.encode_image(images, **image_inputs)
        texts = self.model.encode_text(captions, lengths, **text_inputs)
        if self.model.is_embedding_model():
            encoded, texts = Encoded(self.gather(encoded.emb)), Encoded(self.gather(texts.emb))
        return self.model.similarity(encoded, texts)

    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        """The method's optimizer; the loop rescales every group's lr by its step schedule."""
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=lr)

    def on_epoch_start(self, epoch: int) -> None:
        """Per-epoch switches of the originals (e.g. hardest negatives after a warm-up)."""

    def on_step_start(self, step: int, steps: int) -> None:
        """Before training step `step` (0-based) of an epoch of `steps` steps (e.g. a loss warm-up)."""

    def selection_score(self, results: dict) -> float:
        """Model selection criterion on dev results: rsum, as most originals."""
        return float(results["rsum"])

    def state_dict(self) -> dict[str, Any]:
        """Training-only state (modules, counters), saved in resumable checkpoints for an exact resume."""
        return {name: module.state_dict() for name, module in self.modules().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        modules = self.modules()
        if set(state) != set(modules):
            raise CheckpointError(f"the checkpoint's training-only state {sorted(state)} does not match this "
                                  f"configuration's {sorted(modules)}")
        for name, module in modules.items():
            module.load_state_dict(state[name])


def split_inputs(model: RetrievalModel, inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The extra inputs of `encode_image` and of `encode_text`, by the names the method declares."""
    from itmatch.registry import method_spec

    declared = method_spec(model.cfg.name).inputs(model.cfg)
    if declared is None:
        return {}, {}
    return ({k: inputs[k] for k in declared.image if k in inputs},
            {k: inputs[k] for k in declared.caption if k in inputs})
