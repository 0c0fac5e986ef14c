"""The CPU training path of the GRU caption encoder equals torch's packed GRU bit for bit, forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itmatch.modules.text_gru import GruTextEncoder, packed_gru


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("layers", [1, 2])
def test_packed_gru_equals_torch_bitwise(bidirectional: bool, layers: int) -> None:
    torch.manual_seed(0)
    rnn = nn.GRU(12, 16, layers, batch_first=True, bidirectional=bidirectional)
    lengths = torch.tensor([3, 7, 1, 7, 5, 2])  # unsorted, ties, a one-word caption
    x = torch.randn(6, 7, 12, requires_grad=True)
    results = []
    for run in (lambda p: rnn(p)[0], lambda p: packed_gru(rnn, p)):
        x.grad = None
        rnn.zero_grad()
        out = pad_packed_sequence(run(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)),
                                  batch_first=True)[0]
        (out * torch.linspace(-1, 1, out.shape[-1])).pow(2).sum().backward()
        results.append((out.detach(), x.grad.clone(), [p.grad.clone() for p in rnn.parameters()]))
    (ref_out, ref_x, ref_w), (out, gx, gw) = results
    assert ref_out.abs().sum() > 0 and ref_x.abs().sum() > 0  # something was computed
    assert torch.equal(out, ref_out) and torch.equal(gx, ref_x)
    assert all(torch.equal(a, b) for a, b in zip(gw, ref_w, strict=True))


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
