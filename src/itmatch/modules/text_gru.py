"""GRU caption encoder shared by VSE++, SCAN, VSRN, GSMN and VSE-infinity (BiGRU).

Embedding(V, word_dim) initialised U(-0.1, 0.1) -> GRU run packed on the true lengths, so padding never reaches
the recurrence. `output="last"` returns the state at step length-1 (VSE++, VSRN); `output="all"` returns every
step, zero beyond each length (SCAN, GSMN, VSE-infinity). Bidirectional outputs average the two directions.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


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
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True)  # (B, Lmax, H * dirs), zero padded
        if self.bidirectional:
            out = (out[..., : self.hidden] + out[..., self.hidden :]) / 2
        if self.output == "all":
            return out
        idx = (lengths.to(out.device) - 1).view(-1, 1, 1).expand(-1, 1, out.size(2))
        return out.gather(1, idx).squeeze(1)  # (B, H)
