"""Region geometry as a polar-Gaussian graph (GSMN's visual graph, MoNet-style kernels).

For region centres c_r of one image, every ordered pair (r, s) gets polar pseudo-coordinates of c_r - c_s,

    rho_rs = ||c_r - c_s||,  theta_rs = atan2(dx, dy)                  (x first, as upstream)

and kernel k weighs the pair by exp(-(rho - mu_rho_k)^2 / 2 sigma_rho_k^2) * exp(-dtheta^2 / 2 sigma_theta_k^2),
the angle difference taken the short way round. Weights are normalised over the KERNELS of each pair (not over
neighbours). The weights depend on the image only, so they are computed once per image here; the original
recomputes them for every caption.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def box_centres(boxes: torch.Tensor) -> torch.Tensor:
    """(..., R, 4) boxes x1, y1, x2, y2 -> (..., R, 2) centres, with upstream's operation order."""
    size = boxes[..., 2:] - boxes[..., :2]
    return boxes[..., :2] + 0.5 * size


def polar_pseudo_coords(centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, R, 2) centres -> rho, theta, each (N, R, R), of c_r - c_s at [r, s]."""
    delta = centres[:, :, None, :] - centres[:, None, :, :]
    rho = torch.sqrt(delta[..., 0] ** 2 + delta[..., 1] ** 2)
    theta = torch.atan2(delta[..., 0], delta[..., 1])
    return rho, theta


class PolarGaussianKernels(nn.Module):
    """GSMN's `ImageQueryGraphConvolution`: 8 Gaussian kernels on polar coordinates + one Linear per kernel.

    Parameter names follow the original (mean_rho, mean_theta, precision_rho, precision_theta: (K, 1);
    conv_weights.k: Linear(in_dim -> out_dim // K, no bias)), so released weights load by name.
    """

    def __init__(self, in_dim: int, out_dim: int, n_kernels: int = 8, *, bias: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.n_kernels = n_kernels
        self.conv_weights = nn.ModuleList(
            nn.Linear(in_dim, out_dim // n_kernels, bias=bias, **dd) for _ in range(n_kernels))
        self.mean_rho = nn.Parameter(torch.empty(n_kernels, 1, **dd).uniform_(0.0, 1.0))
        self.mean_theta = nn.Parameter(torch.empty(n_kernels, 1, **dd).uniform_(-math.pi, math.pi))
        self.precision_rho = nn.Parameter(torch.empty(n_kernels, 1, **dd).uniform_(0.0, 1.0))
        self.precision_theta = nn.Parameter(torch.empty(n_kernels, 1, **dd).uniform_(0.0, 1.0))

    def weights(self, rho: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """(...,) pseudo-coordinates -> (..., K) kernel weights normalised over the K kernels.

        NaN weights (from NaN coordinates) become 0 before the normalisation, as upstream; a pair whose K weights
        all underflow to 0 gives 0/0 = NaN after it, also as upstream.
        """
        rho, theta = rho[..., None], theta[..., None]
        w_rho = torch.exp(-0.5 * (rho - self.mean_rho.view(-1)) ** 2 / (1e-14 + self.precision_rho.view(-1) ** 2))
        first = torch.abs(theta - self.mean_theta.view(-1))
        second = torch.abs(2 * math.pi - first)
        w_theta = torch.exp(-0.5 * torch.minimum(first, second) ** 2 / (1e-14 + self.precision_theta.view(-1) ** 2))
        w = w_rho * w_theta
        w = torch.where(torch.isnan(w), torch.zeros_like(w), w)
        return w / w.sum(-1, keepdim=True)

    def node_coefficients(self, boxes: torch.Tensor) -> torch.Tensor:
        """(N, R, 4) normalised boxes -> (N, R, K): sum over neighbours s of the kernel weights of (r, s).

        Upstream's neighbour features are the node's own matching vector (`unsqueeze(2).repeat`), so kernel k of
        node r receives (sum_s w_rsk) * m_r: these sums are all the geometry contributes to a score.
        """
        rho, theta = polar_pseudo_coords(box_centres(boxes))
        return self.weights(rho, theta).sum(2)

    def stacked_weight(self) -> torch.Tensor:
        """(out_dim, in_dim): the per-kernel Linear maps stacked in kernel order (upstream's concat order)."""
        return torch.cat([lin.weight for lin in self.conv_weights], 0)

    def stacked_bias(self) -> torch.Tensor | None:
        if self.conv_weights[0].bias is None:
            return None
        return torch.cat([lin.bias for lin in self.conv_weights], 0)
