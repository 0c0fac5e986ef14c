"""Workspace: buffers are reused across takes, grown when a larger shape is asked for."""

from __future__ import annotations

import torch

from itmatch.modules.workspace import Workspace


def test_takes_share_memory_until_a_larger_shape_is_asked_for() -> None:
    ws = Workspace()
    like = torch.zeros(1)
    a = ws.take("x", (4, 5), like)
    b = ws.take("x", (2, 3), like)
    assert a.shape == (4, 5) and b.shape == (2, 3)
    assert a.data_ptr() == b.data_ptr()  # the smaller shape is a view of the same buffer
    assert ws.take("x", (4, 5), like) is a  # a repeated shape returns the cached view
    big = ws.take("x", (10, 10), like)
    assert big.shape == (10, 10) and big.data_ptr() != a.data_ptr()
    again = ws.take("x", (4, 5), like)  # views of the old buffer are dropped with it
    assert again.data_ptr() == big.data_ptr()
    other = ws.take("y", (4, 5), like)
    assert other.data_ptr() != again.data_ptr()  # names do not share
    assert ws.take("x", (4, 5), torch.zeros(1, dtype=torch.float64)).dtype == torch.float64
