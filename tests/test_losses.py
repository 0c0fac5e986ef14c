import itertools

import pytest
import torch

from itmatch.losses import hinge_loss


def loop_hinge(sims: torch.Tensor, margin: float, max_violation: bool) -> float:
    """The loss written as the paper's sums, one pair at a time."""
    n = len(sims)
    s = sims.tolist()
    total = 0.0
    for i in range(n):
        cap_costs = [max(0.0, margin + s[i][j] - s[i][i]) for j in range(n) if j != i]
        img_costs = [max(0.0, margin + s[j][i] - s[i][i]) for j in range(n) if j != i]
        if max_violation:
            total += max(cap_costs, default=0.0) + max(img_costs, default=0.0)
        else:
            total += sum(cap_costs) + sum(img_costs)
    return total


@pytest.mark.parametrize("max_violation,dtype", list(itertools.product([False, True], [torch.float32, torch.float64])))
def test_hinge_matches_loop(max_violation: bool, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    sims = torch.rand(7, 7, generator=gen, dtype=dtype) * 2 - 1
    got = hinge_loss(sims, margin=0.2, max_violation=max_violation).item()
    assert got == pytest.approx(loop_hinge(sims, 0.2, max_violation), rel=1e-6)


def test_hinge_hand_case() -> None:
    sims = torch.tensor([[0.9, 0.8], [0.1, 0.5]])
    # image 0: caption 1 violates by 0.2 + 0.8 - 0.9 = 0.1; caption 0 as query: image 1 gives 0.2 + 0.1 - 0.9 < 0
    # image 1: caption 0 gives 0.2 + 0.1 - 0.5 < 0; caption 1 as query: image 0 gives 0.2 + 0.8 - 0.5 = 0.5
    assert hinge_loss(sims, margin=0.2).item() == pytest.approx(0.6)
    assert hinge_loss(sims, margin=0.2, max_violation=True).item() == pytest.approx(0.6)


def test_hinge_rejects_non_square() -> None:
    with pytest.raises(ValueError, match="square"):
        hinge_loss(torch.zeros(2, 3))
