"""How a method trains, kept apart from its `nn.Module`: loss, negative schedule and warm-ups, optimizer groups,
selection criterion and training-only modules and state.

The training loop (`itmatch.train`) builds one `Recipe` per run from the method's spec, right after the model (so
training-only modules draw their initial weights after the model's, as the originals), and calls it; models only
encode and score. `collective` is what torchrun needs (identity in one process): a dot-product method mines
negatives over the global batch by gathering its pooled embeddings and computing the loss of the whole batch on
every rank; a cross-attention method gathers its per-region and per-word features and scores only its share of the
pairs (its images against every caption, every image against its captions), which holds every row and column its
anchors need, so the hardest negatives are still mined over the global batch and the quadratic work is split.
Either way the loss and every gradient equal one process's on the concatenated batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from itmatch.distributed import Collective
from itmatch.errors import CheckpointError
from itmatch.losses import hinge_loss, hinge_loss_shard
from itmatch.models.base import Encoded, RetrievalModel


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
        if self.collective.world_size > 1 and not self.model.is_embedding_model():
            rows, cols, offset = self.shard_similarity(images, captions, lengths, image_lengths=image_lengths,
                                                       **inputs)
            local = hinge_loss_shard(rows, cols, offset, margin=self.margin, max_violation=self.max_violation)
            return {"loss": self.collective.global_loss(local)}
        sims = self.similarity(images, captions, lengths, image_lengths=image_lengths, **inputs)
        return {"loss": hinge_loss(sims, margin=self.margin, max_violation=self.max_violation)}

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
        """The batch's (B, B) similarities with gradients; pooled embeddings are gathered over the global batch."""
        encoded, texts = self.encode(images, captions, lengths, image_lengths=image_lengths, **inputs)
        if self.model.is_embedding_model():
            encoded, texts = Encoded(self.collective(encoded.emb)), Encoded(self.collective(texts.emb))
        return self.model.similarity(encoded, texts)

    def shard_similarity(self, images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, *,
                         image_lengths: torch.Tensor | None = None,
                         **inputs: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This rank's share of the global batch's similarities, with gradients: (its images x every caption
        (n, B), every image x its captions (B, n), offset of its pairs in the global batch)."""
        own_images, own_texts = self.encode(images, captions, lengths, image_lengths=image_lengths, **inputs)
        all_images, all_texts = gather_encoded(own_images, self.collective), gather_encoded(own_texts, self.collective)
        offset = sum(self.collective.counts(len(images), images.device)[: self.collective.rank])
        return (self.model.similarity(own_images, all_texts), self.model.similarity(all_images, own_texts), offset)

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
