"""Normalisations exactly as the originals write them (they differ in where eps goes)."""

from __future__ import annotations

import torch

# The epsilon of the originals' l2norm (SCAN, GSMN, VSE-infinity, HREM add it to the norm) and of their cosine
# and l1norm (which clamp at or add it); VSE++ has none.
EPS = 1e-8


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 0.0) -> torch.Tensor:
    """x / (||x|| + eps). VSE++ uses eps=0 (no eps at all); SCAN, VSE-infinity and HREM add 1e-8 to the norm."""
    norm = x.pow(2).sum(dim=dim, keepdim=True).sqrt()
    return x / (norm + eps) if eps else x / norm


def l1norm(x: torch.Tensor, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    """x / (sum |x| + eps)."""
    return x / (x.abs().sum(dim=dim, keepdim=True) + eps)
