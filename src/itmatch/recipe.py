"""How a method trains, kept apart from its `nn.Module`: loss, negative schedule and warm-ups, optimizer groups,
selection criterion and training-only modules and state.

The training loop (`itmatch.training`) builds one `Recipe` per run from the method's spec, right after the model (so
training-only modules draw their initial weights after the model's, as the originals), and calls it; models only
encode and score. `collective` is what torchrun needs (identity in one process): a dot-product method mines
negatives over the global batch by gathering its pooled embeddings and computing the loss of the whole batch on
every rank; a cross-attention method gathers its captions' per-word features, scores only its own images against
every caption and gathers those rows, so each pair is scored once over the ranks (the quadratic work is split) and
every rank mines the hardest negatives in the whole (B, B) matrix. Either way the loss and every gradient equal one
process's on the concatenated batch: each rank's gradient is N times its share (gathers sum the ranks' identical
losses' gradients) and DistributedDataParallel averages over the N ranks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from itmatch.collapse import collapse_signals
from itmatch.distributed import Collective
from itmatch.errors import CheckpointError
from itmatch.losses import hinge_loss
from itmatch.models.base import Encoded, RetrievalModel


def fused(optimizer: type[torch.optim.Optimizer], params: Any, **options: Any) -> torch.optim.Optimizer:
    """`optimizer` (torch's Adam or AdamW, as the originals use) with its fused kernel: one pass over each parameter
    instead of half a dozen (VSE++'s 8.8 M parameters: 5 ms a step against 21-31 ms for the per-tensor loop on one
    CPU thread); the same update up to rounding."""
    return optimizer(params, fused=True, **options)


class Recipe:
    """The default recipe, VSE++'s: bidirectional hinge loss (hardest negative when `train.max_violation`), Adam over
    every trainable weight, model selection on dev rsum; no warm-ups, no training-only modules."""

    # Batch fields the loss takes besides images, captions and lengths (HREM: "image_ids", to group captions).
    batch_inputs: tuple[str, ...] = ()
    # Whether torchrun training equals one process on the concatenated batch (what the recipe's loss gathers
    # covers everything it reads). A recipe whose loss needs more than this class gathers sets it False.
    distributed: bool = True

    def __init__(self, model: RetrievalModel, config: Any, collective: Collective | None = None) -> None:
        self.model, self.config = model, config
        self.margin = config.train.margin
        self.max_violation = config.train.max_violation
        self.collective = collective or Collective()
        # Set by the training loop's collapse guard (`itmatch.collapse`): VSE0 in place of hardest negatives.
        self.vse0_fallback = False
        self.watch_collapse = getattr(config.train, "collapse_guard", "off") != "off"
        self.collapse_signals: dict[str, float] | None = None  # the last hardest-negative batch's, for the guard

    @property
    def trains_distributed(self) -> bool:
        return self.distributed

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

    def encode(self, images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, *,
               image_lengths: torch.Tensor | None = None, **inputs: Any) -> tuple[Encoded, Encoded]:
        """This rank's images and captions through the model's encoders (with the method's extra inputs)."""
        image_inputs, text_inputs = split_inputs(self.model, inputs)
        if image_lengths is not None:
            image_inputs["lengths"] = image_lengths
        return (self.model.encode_image(images, **image_inputs),
                self.model.encode_text(captions, lengths, **text_inputs))

    def similarity(self, images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, *,
                   image_lengths: torch.Tensor | None = None, **inputs: Any) -> torch.Tensor:
        """The global batch's (B, B) similarities with gradients.

        Embedding models gather their pooled embeddings. Cross-attention models gather the captions' per-word
        features and score only this rank's images against every caption; the rows are then gathered, so each pair
        is scored once over the ranks and every rank holds the whole matrix to mine the hardest negatives in."""
        encoded, texts = self.encode(images, captions, lengths, image_lengths=image_lengths, **inputs)
        if self.model.is_embedding_model():
            return self.model.similarity(Encoded(self.collective(encoded.emb)), Encoded(self.collective(texts.emb)))
        return self.collective(self.model.similarity(encoded, gather_encoded(texts, self.collective)))

    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        """The method's optimizer; the loop rescales every group's lr by its step schedule."""
        return fused(torch.optim.Adam, [p for p in self.parameters() if p.requires_grad], lr=lr)

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


def gather_encoded(encoded: Encoded, collective: Collective) -> Encoded:
    """Every rank's encoder outputs in rank order, with autograd: pooled embeddings, or per-region / per-word
    features zero-padded to the longest of the global batch with their lengths (regions without lengths must have
    the same count on every rank, as in one batch)."""
    assert encoded.offsets is None, "training batches are padded, not packed"
    if encoded.lengths is None:
        return Encoded(collective.gather(encoded.emb))
    return Encoded(collective.gather_padded(encoded.emb, dim=1), collective.gather(encoded.lengths))


def split_inputs(model: RetrievalModel, inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The extra inputs of `encode_image` and of `encode_text`, by the names the method declares."""
    from itmatch.registry import method_spec

    declared = method_spec(model.cfg.name).inputs(model.cfg)
    if declared is None:
        return {}, {}
    return ({k: inputs[k] for k in declared.image if k in inputs},
            {k: inputs[k] for k in declared.caption if k in inputs})
