"""benchmarks/original_step.py's import shim: the source rewrites that let an original run on PyTorch 2.x."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def original_step():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("original_step_under_test", BENCH / "original_step.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


FAKE = '''\
import torch
from fakepkg.helper import half

def step(x):
    loss = (x * x).sum()
    I = Variable(torch.ones(2)).cuda()
    return loss.data[0], I

def average(out):
    return (out[:,:,:out.size(2)/2] + out[:,:,out.size(2)/2:])/2

def Variable(t):
    return t
'''


def test_rewrites_make_a_python2_era_module_run_and_are_logged(original_step, tmp_path):
    (tmp_path / "fakepkg").mkdir()
    (tmp_path / "fakepkg" / "__init__.py").write_text("")
    (tmp_path / "fakepkg" / "helper.py").write_text("def half(n):\n    return n.size(0)/2\n")  # no rewrite applies
    (tmp_path / "fakemodel.py").write_text(FAKE)
    # unmodified, this source fails on PyTorch 2.x: indexing a 0-d tensor
    with pytest.raises(IndexError):
        torch.tensor(3.0).data[0]
    log: list[str] = []
    try:
        mod = original_step.import_original(tmp_path, "fakemodel", log)
        value, ones = mod.step(torch.tensor([1.0, 2.0]))
        assert value == 5.0 and isinstance(value, float)  # .item(), not .data[0]
        assert ones.device.type == "cpu"  # the unguarded .cuda() is gone
        out = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
        expected = (out[:, :, :2] + out[:, :, 2:]) / 2  # by hand: the halves of the last dimension averaged
        assert torch.equal(mod.average(out), expected)
        assert sys.modules["fakepkg.helper"].half(torch.zeros(4)) == 2.0  # imported through the shim, untouched
    finally:
        for name in ("fakemodel", "fakepkg", "fakepkg.helper"):
            sys.modules.pop(name, None)
    changes = [line for line in log if not line.startswith("torchvision")]
    assert changes == [
        "fakemodel: loss.data[0] -> loss.item() (0-d tensors cannot be indexed) (1x)",
        "fakemodel: size(k)/2 -> size(k)//2 in a slice (Python 3 division) (1x)",
        "fakemodel: size(k)/2: -> size(k)//2: in a slice (Python 3 division) (1x)",
        "fakemodel: drop an unguarded .cuda() (no GPU) (1x)",
    ]


def test_original_batch_is_sorted_longest_first_like_the_originals_collate(original_step):
    from types import SimpleNamespace

    batch = SimpleNamespace(images=torch.arange(3.0).view(3, 1, 1).expand(3, 2, 4).contiguous(),
                            captions=torch.tensor([[5, 6, 0, 0], [7, 8, 9, 10], [11, 0, 0, 0]]),
                            lengths=torch.tensor([2, 4, 1]), image_lengths=torch.tensor([2, 1, 2]))
    (images, captions, lengths), kwargs = original_step.original_batch("vse_inf_bigru", batch)
    assert lengths == [4, 2, 1]
    assert captions.tolist() == [[7, 8, 9, 10], [5, 6, 0, 0], [11, 0, 0, 0]]
    assert images[:, 0, 0].tolist() == [1.0, 0.0, 2.0]
    assert kwargs["image_lengths"].tolist() == [1, 2, 2]
    (pooled, _, _), _ = original_step.original_batch("vsepp", batch)
    assert pooled.shape == (3, 4) and pooled[:, 0].tolist() == [1.0, 0.0, 2.0]  # the regions' mean per image
