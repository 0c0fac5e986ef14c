"""The region-feature MLP of VSE-infinity and HREM: `fc(v) + MLP(v)` per region, MLP = Linear -> BN -> ReLU -> Linear.

Both originals build `MLP(in, in // 2 ... , out, num_layers=2)` with a BatchNorm after each layer but apply only
the first (`bns.1` is created, saved in every checkpoint and never used).
"""

from __future__ import annotations

import torch
from torch import nn


class RegionMlp(nn.Module):
    """Upstream `MLP(in, hidden, out, num_layers=2)` on flattened (B*K, D) rows; `bns.1` exists but is unused."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.layers = nn.ModuleList([nn.Linear(in_dim, hidden, **dd), nn.Linear(hidden, out_dim, **dd)])
        self.bns = nn.ModuleList([nn.BatchNorm1d(hidden, **dd), nn.BatchNorm1d(out_dim, **dd)])
        self.bns[1].requires_grad_(False)  # never applied upstream: no gradient, so AdamW never touched it either

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, k, d = x.shape
        # Padded regions are rows like the others here, so they enter the BatchNorm statistics in training (upstream).
        h = torch.relu(self.bns[0](self.layers[0](x.reshape(b * k, d))))
        return self.layers[1](h).view(b, k, -1)


class FcMlp(nn.Module):
    """(B, K, in_dim) -> (B, K, out_dim) as `fc(x) + mlp(x)` (HREM's `FC_MLP`; VSE-infinity inlines the same sum)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim, device=device, dtype=dtype)
        self.mlp = RegionMlp(in_dim, hidden, out_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.mlp(x)
