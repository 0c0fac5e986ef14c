"""GRU caption encoder shared by VSE++, SCAN, VSRN, GSMN and VSE-infinity (BiGRU).

Embedding(V, word_dim) initialised U(-0.1, 0.1) -> GRU run packed on the true lengths, so padding never reaches
the recurrence. `output="last"` returns the state at step length-1 (VSE++, VSRN); `output="all"` returns every
step, zero beyond each length (SCAN, GSMN, VSE-infinity). Bidirectional outputs average the two directions.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence


def _gru_steps(gates_in: list[torch.Tensor], w_hh: torch.Tensor, b_hh: torch.Tensor, reverse: bool,
               saved: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None) -> list[torch.Tensor]:
    """The GRU recurrence over packed time steps from a zero state, op for op as ATen's CPU `GRUCell` with
    precomputed input gates.

    `gates_in[t]` (batch_t, 3H) are the input projections of step t, batch sizes non-increasing; returns the
    hidden state of every step. Forward: finished sequences leave the batch; reverse: they join it (zero state).
    The first step's product with the zero state is b_hh exactly (for finite W_hh), so it is not computed.
    `saved`: two lists (one slot per step) that receive each step's [reset, update, W_hn h + b_hn] and candidate
    state, what `_GruRecurrence`'s backward needs (W_hn h + b_hn is then kept, not scaled in place).
    """
    hidden = gates_in[0].new_zeros(len(gates_in[0]), w_hh.size(1))
    out: list[torch.Tensor] = [hidden] * len(gates_in)
    steps = range(len(gates_in) - 1, -1, -1) if reverse else range(len(gates_in))
    h = hidden[: len(gates_in[steps[0]])]
    for t in steps:
        n = len(gates_in[t])
        if n < len(h):
            h = h[:n]
        elif n > len(h):
            h = torch.cat([h, hidden[len(h) : n]])
        i_r, i_z, i_n = gates_in[t].unsafe_chunk(3, 1)
        hh = b_hh.expand(n, -1).clone() if t == steps[0] else F.linear(h, w_hh, b_hh)
        h_r, h_z, h_n = hh.unsafe_chunk(3, 1)
        reset = h_r.add_(i_r).sigmoid_()
        update = h_z.add_(i_z).sigmoid_()
        new = i_n.add(h_n.mul_(reset) if saved is None else h_n * reset).tanh_()
        h = (h - new).mul_(update).add_(new)
        out[t] = h
        if saved is not None:
            saved[0][t], saved[1][t] = hh, new  # hh is now [reset, update, W_hn h + b_hn]
    return out


class _GruRecurrence(torch.autograd.Function):
    """One direction of one GRU layer over packed steps, with a backward that batches the weight gradients.

    Forward: `_gru_steps`, keeping each step's reset/update gates, the recurrent candidate part `W_hn h + b_hn` and
    the candidate state. Every input is in one dtype (`packed_gru` casts the weights to the gates' dtype under
    autocast), so the forward and the backward run in it. Backward: the recurrence runs backwards computing per
    step only what is sequential (the gate gradients, the state gradient through W_hh), written into one packed
    (N, 3H) buffer; then dW_hh is ONE product over all steps (dgates^T @ h_prev), db_hh one sum, and the input
    gates get their gradient for all steps at once, so autograd's per-step products and its per-step
    accumulation of a 3H x H gradient are gone. The initial state is zero and gets no gradient.
    """

    @staticmethod
    def forward(ctx, gates_in: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor, sizes: tuple[int, ...],
                reverse: bool) -> torch.Tensor:
        saved_hh: list[torch.Tensor] = [gates_in] * len(sizes)
        saved_new: list[torch.Tensor] = [gates_in] * len(sizes)
        out = _gru_steps(list(gates_in.split(sizes)), w_hh, b_hh, reverse, (saved_hh, saved_new))
        ctx.sizes, ctx.reverse = sizes, reverse
        ctx.steps = (saved_hh, saved_new, out)
        ctx.save_for_backward(w_hh)
        return torch.cat(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (w_hh,) = ctx.saved_tensors
        saved_hh, saved_new, out = ctx.steps
        sizes, reverse = ctx.sizes, ctx.reverse
        hs = w_hh.size(1)
        grads = grad_out.split(sizes)
        offsets = [0]
        for n in sizes[:-1]:
            offsets.append(offsets[-1] + n)
        prev: list[torch.Tensor] = []  # every step's previous state, in packed order
        for t, n in enumerate(sizes):
            src = t + 1 if reverse else t - 1
            if not 0 <= src < len(sizes):
                prev.append(grad_out.new_zeros(n, hs))
            elif len(out[src]) < n:  # reverse: sequences that start at step t join with a zero state
                prev.append(torch.cat([out[src], grad_out.new_zeros(n - len(out[src]), hs)]))
            else:
                prev.append(out[src][:n])
        dgates = grad_out.new_empty(len(grad_out), 3 * hs)  # packed d[reset, update, W_hn h + b_hn] pre-activation
        dcand = grad_out.new_empty(len(grad_out), hs)  # packed d(i_n + reset * (W_hn h + b_hn))
        carry = None  # gradient of the previous step's h_prev
        last = len(sizes) - 1 if reverse else 0
        for t in range(len(sizes)) if reverse else range(len(sizes) - 1, -1, -1):
            n, o = sizes[t], offsets[t]
            if carry is None:
                dh = grads[t]
            elif reverse:  # step t's state was the first rows of step t-1's h_prev
                dh = grads[t] + carry
            else:  # the first rows of step t's state were step t+1's h_prev
                dh = grads[t].clone()
                dh[: len(carry)] += carry
            reset, update, h_n = saved_hh[t].unsafe_chunk(3, 1)
            new = saved_new[t]
            g = dgates[o : o + n]
            d_r, d_z, d_hn = g.unsafe_chunk(3, 1)
            dc = dcand[o : o + n]
            torch.mul(dh - dh * update, 1 - new * new, out=dc)  # h = (1 - z) new + z h_prev, new = tanh(.)
            torch.mul(dh * (prev[t] - new), update * (1 - update), out=d_z)
            torch.mul(dc, h_n, out=d_r).mul_(reset * (1 - reset))
            torch.mul(dc, reset, out=d_hn)
            if t != last:  # the first step's h_prev is the zero initial state, which gets no gradient
                # reverse: only the rows of h_prev that were step t+1's state (the rest were zeros)
                m = sizes[t + 1] if reverse else n
                carry = torch.addmm((dh * update)[:m], g[:m], w_hh)
        d_w = dgates.t().mm(torch.cat(prev)) if ctx.needs_input_grad[1] else None
        d_b = dgates.sum(0) if ctx.needs_input_grad[2] else None
        d_in = torch.cat([dgates[:, : 2 * hs], dcand], 1) if ctx.needs_input_grad[0] else None
        return d_in, d_w, d_b, None, None


def packed_gru(rnn: nn.GRU, packed: PackedSequence, *, batched_backward: bool = True) -> PackedSequence:
    """`rnn(packed)[0]` with the same floating-point operations, for CPU training.

    ATen's packed GRU slices each time step out of the precomputed input gates with `narrow`, whose backward
    writes every step's gradient into a zero tensor the size of all the gates (for a batch of 128 captions of
    about 15 words: 29 steps x 25 MB of zero fills and additions per direction, about a third of VSE++'s
    backward). Splitting the gates instead gives the same numbers with one concatenation in the backward.

    The forward is `rnn(packed)[0]` bit for bit. Under autograd each direction of each layer runs as
    `_GruRecurrence`, whose backward gets the recurrent weights' gradient with one matrix product over all steps
    instead of autograd's one small product (and one 3H x H accumulation) per step: the gradients equal autograd's
    up to summation order (last bits). `batched_backward=False` runs autograd through `_gru_steps` instead
    (torch's gradients bit for bit).
    """
    sizes = packed.batch_sizes.tolist()
    x = packed.data
    for layer in range(rnn.num_layers):
        outs = []
        for sfx in ("", "_reverse")[: 2 if rnn.bidirectional else 1]:
            w_ih, w_hh, b_ih, b_hh = (getattr(rnn, f"{n}_l{layer}{sfx}")
                                      for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            gates = F.linear(x, w_ih, b_ih)
            # Under autocast the gates come out in the lower precision, as autocast would run the recurrent
            # products: the recurrence runs in the gates' dtype throughout (the casts' backward returns float32
            # gradients to the weights). Without autocast the casts are no-ops.
            w_hh, b_hh = w_hh.to(gates.dtype), b_hh.to(gates.dtype)
            if batched_backward and torch.is_grad_enabled():
                outs.append(_GruRecurrence.apply(gates, w_hh, b_hh, tuple(sizes), bool(sfx)))
            else:
                outs.append(torch.cat(_gru_steps(list(gates.split(sizes)), w_hh, b_hh, reverse=bool(sfx))))
        x = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
        if rnn.dropout and rnn.training and layer < rnn.num_layers - 1:
            x = F.dropout(x, rnn.dropout, training=True)
    return PackedSequence(x, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)


def packed_rows(packed: PackedSequence, lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, steps) indices into `packed.data` of each caption's step t, in the captions' own order; positions at or
    beyond a caption's length get len(packed.data) (a row past the end, for a zero padding row)."""
    sizes = packed.batch_sizes
    offsets = torch.zeros(len(sizes), dtype=torch.long)
    offsets[1:] = sizes.cumsum(0)[:-1]
    slot = packed.unsorted_indices if packed.unsorted_indices is not None else torch.arange(len(lengths))
    t = torch.arange(steps)
    rows = offsets[t.clamp(max=len(sizes) - 1)].view(1, -1) + slot.cpu().view(-1, 1)
    return torch.where(t.view(1, -1) < lengths.cpu().view(-1, 1), rows, len(packed.data))


class GruTextEncoder(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        word_dim: int = 300,
        hidden: int = 1024,
        *,
        num_layers: int = 1,
        bidirectional: bool = False,
        output: Literal["last", "all"] = "last",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.embed = nn.Embedding(vocab_size, word_dim, **dd)
        self.rnn = nn.GRU(word_dim, hidden, num_layers, batch_first=True, bidirectional=bidirectional, **dd)
        self.bidirectional = bidirectional
        self.output = output
        self.hidden = hidden
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """captions (B, L) int64, lengths (B,) -> (B, H) for "last" or (B, max(lengths), H) for "all"."""
        x = self.embed(captions)  # (B, L, W)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        if x.device.type == "cpu" and self.rnn.bias and torch.is_grad_enabled():
            out = packed_gru(self.rnn, packed)  # same numbers, a cheaper backward
        else:
            out, _ = self.rnn(packed)
        data = out.data
        if self.bidirectional:  # elementwise, so averaging the packed rows equals averaging the padded ones
            data = (data[:, : self.hidden] + data[:, self.hidden :]) / 2
        lengths = lengths.cpu()
        if self.output == "last":
            rows = packed_rows(out, lengths, int(lengths.max()))
            return data.index_select(0, rows.gather(1, (lengths - 1).view(-1, 1)).view(-1).to(data.device))
        # what pad_packed_sequence returns (zero beyond each length), with one gather instead of a copy per
        # distinct length, each of which costs a copy of the whole padded gradient in the backward
        steps = len(out.batch_sizes)
        rows = packed_rows(out, lengths, steps).view(-1).to(data.device)
        padded = torch.cat([data, data.new_zeros(1, data.size(1))]).index_select(0, rows)
        return padded.view(len(lengths), steps, data.size(1))  # (B, Lmax, H)
