"""A stack of post-norm transformer encoder layers over padded sets, in torch's `nn.TransformerEncoder` key layout.

`nn.TransformerEncoderLayer(d, nhead, dim_feedforward, dropout)` is post-norm with ReLU:
x = LN1(x + OutProj(MHA(x))), x = LN2(x + W2 relu(W1 x)), its attention packing Q, K, V in `in_proj_weight`
(3d, d). The originals run it sequence-first; here it is batch-first, the same maps and the same parameter names.
"""

from __future__ import annotations

import torch
from torch import nn

from itmatch.modules.pooling import valid_mask


def post_norm_encoder(dim: int, nhead: int, ffn_dim: int, dropout: float, num_layers: int = 1, *,
                      device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> nn.TransformerEncoder:
    """`num_layers` post-norm ReLU layers (keys `layers.{i}.self_attn.in_proj_weight`, `linear1`, `norm1`, ...)."""
    layer = nn.TransformerEncoderLayer(dim, nhead, dim_feedforward=ffn_dim, dropout=dropout, batch_first=True,
                                       device=device, dtype=dtype)
    return nn.TransformerEncoder(layer, num_layers=num_layers, norm=None, enable_nested_tensor=False)


def encode_set(encoder: nn.TransformerEncoder, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, L, D) -> (B, L, D); positions at or beyond lengths[b] are keys nobody attends to (outputs meaningless)."""
    return encoder(x, src_key_padding_mask=~valid_mask(lengths.to(x.device), x.shape[1]))
