"""Attention captioner over region features, trained with teacher forcing (S2VT-Att, as VSRN's caption branch).

Encoder: per-region Linear(D -> H) (Xavier-normal weight), dropout, GRU(H, H) over the regions.
Decoder: GRU cell started from the encoder's final state; at step t its input is
`dropout([embed(word_t) ; attention context])`, where the context is additive attention over the encoder outputs
with the current state, `softmax_r(w2 . tanh(W1 [e_r ; h]))`; the output is `log_softmax(Linear(H -> V))`
(Xavier-normal weight). Word embeddings keep PyTorch's N(0, 1) init; the attention layers keep the default init.

The original (VSRN models/{EncoderRNN,DecoderRNN,Attention}.py, from the video-captioning S2VT repo) recomputes
W1 [e_r ; h] for every region at every step; we split W1 into its region and state halves and project the
regions once per caption. Same function, the one large product done once instead of per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RegionCaptioner(nn.Module):
    """Region features (B, R, D) + teacher-forced word ids (B, T) -> per-step log-probabilities (B, T, V)."""

    def __init__(self, feature_dim: int, vocab_size: int, *, hidden: int = 512, word_dim: int = 300,
                 dropout: float = 0.2, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.hidden = hidden
        # encoder
        self.region_proj = nn.Linear(feature_dim, hidden, **dd)
        self.encoder = nn.GRU(hidden, hidden, 1, batch_first=True, **dd)
        nn.init.xavier_normal_(self.region_proj.weight)
        # decoder
        self.embed = nn.Embedding(vocab_size, word_dim, **dd)
        self.att_hidden = nn.Linear(2 * hidden, hidden, **dd)  # W1 over [e_r ; h]
        self.att_score = nn.Linear(hidden, 1, bias=False, **dd)
        self.decoder = nn.GRUCell(word_dim + hidden, hidden, **dd)
        self.out = nn.Linear(hidden, vocab_size, **dd)
        nn.init.xavier_normal_(self.out.weight)
        self.dropout = nn.Dropout(dropout)

    def forward(self, regions: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the next word after each of `words` (B, T): (B, T, V)."""
        enc, h = self.encoder(self.dropout(self.region_proj(regions)))  # (B, R, H), (1, B, H)
        h = h[0]
        w_enc, w_state = self.att_hidden.weight.split(self.hidden, dim=1)
        enc_part = F.linear(enc, w_enc, self.att_hidden.bias)  # (B, R, H), once per caption
        emb = self.embed(words)  # (B, T, W)
        steps = []
        for t in range(words.shape[1]):
            scores = self.att_score(torch.tanh(enc_part + F.linear(h, w_state)[:, None]))  # (B, R, 1)
            context = (scores.softmax(dim=1) * enc).sum(dim=1)  # (B, H)
            h = self.decoder(self.dropout(torch.cat([emb[:, t], context], dim=1)), h)
            steps.append(h)
        return F.log_softmax(self.out(torch.stack(steps, dim=1)), dim=-1)
