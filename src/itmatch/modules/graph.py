"""Residual graph convolution over image regions (VSRN's `Rs_GCN`, a non-local block without softmax).

For region features V (R, D) of one image:

    R_ij = <theta(v_i), phi(v_j)> / R          # fully connected affinity graph, no softmax
    y_i  = sum_j R_ij g(v_j)
    v*_i = BN(W y_i) + v_i                     # BN's weight and bias start at 0: the block starts as the identity

theta, phi, g and W are 1x1 convolutions in the original (weights stored (out, in, 1)); here they are Linear
layers acting on (B, R, D) features, the same maps with the kernel axis squeezed (and the same default init).
The batch norm normalises each channel over batch and regions, as BatchNorm1d on (B, D, R) does.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualGraphConv(nn.Module):
    """One residual graph-reasoning layer: (B, R, D) -> (B, R, D)."""

    def __init__(self, dim: int, inter_dim: int | None = None, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        inter = inter_dim or dim  # VSRN passes inter_channels = D (the non-local default would be D // 2)
        # Creation order as upstream (g, W, theta, phi), so a seeded build draws the same initial weights.
        self.g = nn.Linear(dim, inter, **dd)
        self.w = nn.Linear(inter, dim, **dd)
        self.bn = nn.BatchNorm1d(dim, **dd)
        nn.init.zeros_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        self.theta = nn.Linear(dim, inter, **dd)
        self.phi = nn.Linear(dim, inter, **dd)

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        b, r, d = regions.shape
        affinity = self.theta(regions) @ self.phi(regions).transpose(1, 2) / r  # (B, R, R)
        y = self.w(affinity @ self.g(regions))  # (B, R, D)
        return self.bn(y.reshape(b * r, d)).view(b, r, d) + regions
