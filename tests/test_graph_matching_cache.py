"""GSMN's cached triangle indices stay usable by autograd after an evaluation in inference mode."""

import torch

from itmatch.modules import graph_matching


def test_triangle_cached_under_inference_mode_still_trains() -> None:
    graph_matching._triangle.cache_clear()
    with torch.inference_mode():  # an evaluation fills the cache first
        graph_matching._triangle_gram(torch.randn(2, 5, 16), 4)
    x = torch.randn(2, 5, 16, requires_grad=True)
    graph_matching._triangle_gram(x, 4).sum().backward()  # raised "Inference tensors cannot be saved for backward"
    expected = torch.zeros(2, 5, 16)
    for b in range(2):  # d/dx of sum over i <= j of c_ij <x_i, x_j> per block, c = 1 on the diagonal, 2 above it
        for i in range(5):
            expected[b, i] = 2 * x[b].detach().sum(0)
    torch.testing.assert_close(x.grad, expected)
