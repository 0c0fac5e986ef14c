"""A stack of post-norm transformer encoder layers over padded sets, in torch's `nn.TransformerEncoder` key layout.

`nn.TransformerEncoderLayer(d, nhead, dim_feedforward, dropout)` is post-norm with ReLU:
x = LN1(x + OutProj(MHA(x))), x = LN2(x + W2 relu(W1 x)), its attention packing Q, K, V in `in_proj_weight`
(3d, d). Sequence-first as the originals (`batch_first=False`), which also keeps torch off its inference "fast
path" (`torch._transformer_encoder_layer_fwd`): on torch 2.13 CPU that path returns NaN for an additive float mask.
"""

from __future__ import annotations

import torch
from torch import nn

from itmatch.modules.pooling import valid_mask


def post_norm_encoder(dim: int, nhead: int, ffn_dim: int, dropout: float, num_layers: int = 1, *,
                      device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> nn.TransformerEncoder:
    """`num_layers` post-norm ReLU layers (keys `layers.{i}.self_attn.in_proj_weight`, `linear1`, `norm1`, ...)."""
    layer = nn.TransformerEncoderLayer(dim, nhead, dim_feedforward=ffn_dim, dropout=dropout, device=device,
                                       dtype=dtype)
    return nn.TransformerEncoder(layer, num_layers=num_layers, norm=None, enable_nested_tensor=False)


def encode_set(encoder: nn.TransformerEncoder, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, L, D) -> (B, L, D); positions at or beyond lengths[b] are keys nobody attends to (outputs meaningless)."""
    pad = ~valid_mask(lengths.to(x.device), x.shape[1])
    return encoder(x.transpose(0, 1), src_key_padding_mask=pad).transpose(0, 1)
