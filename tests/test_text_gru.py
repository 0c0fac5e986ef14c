"""The CPU training path of the GRU caption encoder equals torch's packed GRU bit for bit, forward and backward."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itmatch.modules.text_gru import GruTextEncoder, _GruRecurrence, packed_gru


def _run(rnn: nn.GRU, x: torch.Tensor, lengths: torch.Tensor, run) -> tuple:
    x.grad = None
    rnn.zero_grad()
    out = pad_packed_sequence(run(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)),
                              batch_first=True)[0]
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).pow(2).sum().backward()
    return out.detach(), [x.grad.clone()] + [p.grad.clone() for p in rnn.parameters()]


def _graph_nodes(fn) -> set[str]:
    seen, todo = set(), [fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(next_fn for next_fn, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("layers", [1, 2])
def test_packed_gru_equals_torch(bidirectional: bool, layers: int) -> None:
    """Forward bit for bit with both backwards; autograd through _gru_steps gives torch's gradients bit for bit,
    the batched backward the same gradients up to summation order."""
    torch.manual_seed(0)
    rnn = nn.GRU(12, 16, layers, batch_first=True, bidirectional=bidirectional)
    lengths = torch.tensor([3, 7, 1, 7, 5, 2])  # unsorted, ties, a one-word caption: the batch shrinks per step
    x = torch.randn(6, 7, 12, requires_grad=True)
    ref_out, ref_grads = _run(rnn, x, lengths, lambda p: rnn(p)[0])
    out, grads = _run(rnn, x, lengths, lambda p: packed_gru(rnn, p, batched_backward=False))
    fast_out, fast_grads = _run(rnn, x, lengths, lambda p: packed_gru(rnn, p))
    assert ref_out.abs().sum() > 0 and ref_grads[0].abs().sum() > 0  # something was computed
    assert torch.equal(out, ref_out) and torch.equal(fast_out, ref_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))
    for a, b in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_under_bf16_autocast_the_recurrence_runs_in_bfloat16_and_returns_float32_gradients() -> None:
    """Both backwards see one dtype: the forward is the same with either, and so are the gradients up to bfloat16
    summation order; the float32 weights get float32 gradients."""
    torch.manual_seed(0)
    rnn = nn.GRU(12, 16, 1, batch_first=True, bidirectional=True)
    lengths = torch.tensor([3, 7, 1, 7, 5, 2])
    x = torch.randn(6, 7, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _run(rnn, x, lengths, lambda p: packed_gru(rnn, p, batched_backward=False))
        fast_out, fast_grads = _run(rnn, x, lengths, lambda p: packed_gru(rnn, p))
    assert out.dtype == torch.bfloat16 and torch.equal(fast_out, out)
    assert all(g.dtype == torch.float32 for g in fast_grads) and fast_grads[1].abs().sum() > 0
    for a, b in zip(fast_grads, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_batched_backward_is_the_one_that_runs_under_autograd() -> None:
    torch.manual_seed(0)
    rnn = nn.GRU(4, 5, 2, bidirectional=True)
    packed = pack_padded_sequence(torch.randn(3, 2, 4), torch.tensor([3, 2]))
    assert "_GruRecurrenceBackward" in _graph_nodes(packed_gru(rnn, packed).data.grad_fn)
    assert "_GruRecurrenceBackward" not in _graph_nodes(packed_gru(rnn, packed, batched_backward=False).data.grad_fn)


@pytest.mark.parametrize("reverse", [False, True])
def test_gru_recurrence_gradcheck(reverse: bool) -> None:
    """float64 finite differences of one direction, batch shrinking per step (in reverse: sequences join)."""
    torch.manual_seed(0)
    sizes = (4, 4, 3, 1)
    gates = torch.randn(sum(sizes), 9, dtype=torch.float64, requires_grad=True)
    w_hh = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    b_hh = torch.randn(9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, w, b: _GruRecurrence.apply(g, w, b, sizes, reverse),
                                    (gates, w_hh, b_hh))


def test_packed_gru_gradcheck_bidirectional_two_layers() -> None:
    """float64 finite differences through packed_gru: both directions, two layers, unsorted lengths, all weights."""
    torch.manual_seed(0)
    rnn = nn.GRU(3, 4, 2, bidirectional=True, dtype=torch.float64)
    lengths = torch.tensor([2, 4, 1, 4])
    names = [n for n, _ in rnn.named_parameters()]

    def run(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:  # packed_gru reads the weights by name
        gru = SimpleNamespace(**dict(zip(names, params, strict=True)), num_layers=2, bidirectional=True,
                              hidden_size=4, dropout=0.0, training=True)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        return packed_gru(gru, packed).data  # type: ignore[arg-type]

    x = torch.randn(4, 4, 3, dtype=torch.float64, requires_grad=True)
    params = tuple(p.detach().clone().requires_grad_() for p in rnn.parameters())
    assert torch.autograd.gradcheck(run, (x, *params))


def test_encoder_uses_the_same_numbers_with_and_without_autograd() -> None:
    torch.manual_seed(0)
    enc = GruTextEncoder(20, 8, 16, bidirectional=True, output="all")
    captions = torch.randint(1, 20, (4, 6))
    lengths = torch.tensor([6, 2, 4, 4])
    with torch.no_grad():
        plain = enc(captions, lengths)  # torch's packed GRU
    assert torch.equal(enc(captions, lengths).detach(), plain)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("output", ["last", "all"])
def test_encoder_unpacks_as_pad_packed_sequence_bitwise(bidirectional: bool, output: str) -> None:
    """The encoder reads its outputs from the packed rows by index; the reference pads with
    pad_packed_sequence, averages the directions and gathers step length-1, as the originals do."""
    torch.manual_seed(0)
    enc = GruTextEncoder(20, 8, 16, bidirectional=bidirectional, output=output)
    captions = torch.randint(1, 20, (6, 9))
    lengths = torch.tensor([3, 7, 1, 7, 5, 2])  # unsorted, ties, a one-word caption, max below the padded width

    def reference(captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(enc.embed(captions), lengths, batch_first=True, enforce_sorted=False)
        out = pad_packed_sequence(packed_gru(enc.rnn, packed), batch_first=True)[0]
        if bidirectional:
            out = (out[..., :16] + out[..., 16:]) / 2
        if output == "all":
            return out
        return out.gather(1, (lengths - 1).view(-1, 1, 1).expand(-1, 1, 16)).squeeze(1)

    results = []
    for run in (reference, enc):
        enc.zero_grad()
        out = run(captions, lengths)
        (out * torch.linspace(-1, 1, out.shape[-1])).pow(2).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in enc.parameters()]))
    (ref, ref_grads), (out, grads) = results
    assert out.shape == ref.shape == ((6, 7, 16) if output == "all" else (6, 16))
    assert ref.abs().sum() > 0 and ref_grads[0].abs().sum() > 0  # something was computed, back to the words
    assert torch.equal(out, ref)
    if output == "all":
        assert not out[2, 1:].any() and out[2, 0].any()  # zero beyond the one-word caption's length
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))


def test_batched_backward_float32_agrees_at_the_papers_sizes() -> None:
    """300-d words, 1024-d BiGRU, 64 captions of 2-20 words: the float32 gradients of both backwards lie within
    ~1e-6 (relative to each gradient's largest entry) of float64 ones, and of each other."""
    torch.manual_seed(0)
    rnn = nn.GRU(300, 1024, batch_first=True, bidirectional=True)
    lengths = torch.randint(2, 21, (64,))
    x = torch.randn(64, int(lengths.max()), 300, requires_grad=True)
    _, fast = _run(rnn, x, lengths, lambda p: packed_gru(rnn, p))
    _, step = _run(rnn, x, lengths, lambda p: packed_gru(rnn, p, batched_backward=False))
    rnn.double()
    x64 = x.detach().double().requires_grad_()
    _, exact = _run(rnn, x64, lengths, lambda p: packed_gru(rnn, p, batched_backward=False))
    for f, s, e in zip(fast, step, exact, strict=True):
        scale = e.abs().max()
        assert scale > 0
        assert (f.double() - e).abs().max() / scale < 2e-6
        assert (s.double() - e).abs().max() / scale < 2e-6
        assert (f - s).abs().max() / scale < 2e-6
