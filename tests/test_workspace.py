"""Workspace: buffers reused across takes, grown on demand; run_tiles: tiles on threads."""

from __future__ import annotations

import pytest
import torch

from itmatch.modules.workspace import Workspace, run_tiles


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


def test_run_tiles_on_threads_carries_the_modes_and_restores_the_thread_count() -> None:
    saved = torch.get_num_threads()
    seen = []

    def fn(tile: int, ws: Workspace) -> None:
        buf = ws.take("x", (3,), torch.zeros(1))
        seen.append((tile, torch.is_inference_mode_enabled(), torch.is_grad_enabled(), torch.get_num_threads(),
                     buf.data_ptr()))

    with torch.inference_mode():
        run_tiles(fn, list(range(6)), workers=2)
    assert sorted(t for t, *_ in seen) == list(range(6))
    assert all(inf and not grad and threads == 1 for _, inf, grad, threads, _ in seen)
    assert len({ptr for *_, ptr in seen}) <= 2  # one workspace per worker thread, reused across its tiles
    assert torch.get_num_threads() == saved
    seen.clear()
    with torch.no_grad():
        run_tiles(fn, [0, 1], workers=2)
    assert all(not inf and not grad for _, inf, grad, *_ in seen)


def test_run_tiles_re_raises_a_workers_error() -> None:
    def fn(tile: int, ws: Workspace) -> None:
        if tile == 3:
            raise ValueError("tile 3")

    with pytest.raises(ValueError, match="tile 3"):
        run_tiles(fn, list(range(5)), workers=2)
