"""`MappedArray` asks the kernel for every row of a batch before copying it (cold random reads in parallel)."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from itmatch.data.npy import MappedArray


def test_a_batch_asks_for_exactly_its_rows_and_reads_them_unchanged(tmp_path: Path, monkeypatch) -> None:
    data = np.arange(7 * 3 * 1024, dtype=np.float32).reshape(7, 3, 1024)  # rows of 12 KB: page multiples
    np.save(tmp_path / "x.npy", data)
    arr = MappedArray(tmp_path / "x.npy")
    assert arr.array.shape == data.shape  # opens the mapping
    calls = []
    real = arr._map

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def madvise(self, option, start=0, length=None):
            calls.append((option, start, length))
            return real.madvise(option, start, length) if length is not None else real.madvise(option)

    monkeypatch.setattr(arr, "_map", Spy())
    out = arr[[5, 1, 5, -1]]
    np.testing.assert_array_equal(out, data[[5, 1, 5, -1]])
    row_bytes = 3 * 1024 * 4
    will = [(s, n) for o, s, n in calls if o == mmap.MADV_WILLNEED]
    assert len(will) == 3, "one request per distinct row (5, 1 and 6 = -1)"
    covered = sorted((s, s + n) for s, n in will)
    for row in (1, 5, 6):
        start = arr._offset + row * row_bytes
        assert any(a <= start and start + row_bytes <= b for a, b in covered), f"row {row} requested"
        assert all(a % mmap.PAGESIZE == 0 for a, _ in covered)
    calls.clear()
    np.testing.assert_array_equal(arr[2], data[2])
    assert not [c for c in calls if c[0] == mmap.MADV_WILLNEED], "a single row is read directly"
