"""A port of GSMN's scoring loop, written from the reference spec (vsrn_and_gsmn.md, B.4-B.5): not the original.

It keeps the original's structure and arithmetic order: one caption at a time against a shard of images, the
caption repeated per image, attended vectors materialised and split into blocks, the neighbour tensors built with
`repeat`, the Gaussian kernel weights recomputed for every caption, the per-kernel Linear layers applied one by
one. It reads the weights of an `itmatch` Gsmn model and serves as the oracle of the tests and the baseline of
`benchmarks/gsmn_eval.py` ("port of the original loop"). Not part of the library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from itmatch.models.gsmn import Gsmn


def _l2norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + 1e-8)


def _cosine(x1: torch.Tensor, x2: torch.Tensor, dim: int) -> torch.Tensor:
    w12 = (x1 * x2).sum(dim)
    return w12 / (torch.norm(x1, 2, dim) * torch.norm(x2, 2, dim)).clamp(min=1e-8)


def _inter_relations(k: torch.Tensor, q: torch.Tensor, lam: float) -> torch.Tensor:
    """(B, queryL, sourceL) attention of each query item over the source items."""
    attn = torch.bmm(k, q.transpose(1, 2))  # (B, sourceL, queryL)
    attn = _l2norm(F.leaky_relu(attn, 0.1), 2)
    return torch.softmax(attn.transpose(1, 2) * lam, dim=2)


def _block_cos(query: torch.Tensor, attn: torch.Tensor, context: torch.Tensor, chunk: int) -> torch.Tensor:
    weighted = torch.bmm(context.transpose(1, 2), attn.transpose(1, 2)).transpose(1, 2)  # (B, queryL, d)
    q = torch.stack(torch.split(query, chunk, dim=2), dim=2)
    c = torch.stack(torch.split(weighted, chunk, dim=2), dim=2)
    return _cosine(q, c, dim=-1)  # (B, queryL, n_blocks)


def _kernel_linear(weighted: torch.Tensor, convs: torch.nn.ModuleList) -> torch.Tensor:
    return torch.cat([convs[k](weighted[:, k]).unsqueeze(1) for k in range(len(convs))], 1).flatten(1)


def _head(h: torch.Tensor, head: torch.nn.Module, batch: int) -> torch.Tensor:
    sim = head.out_2(torch.tanh(head.out_1(h)))
    return sim.view(batch, -1).mean(dim=1, keepdim=True)


def gaussian_weights(conv: torch.nn.Module, rho: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """(P, K) kernel weights of P flattened pairs, normalised over kernels (upstream get_gaussian_weights)."""
    diff = (rho.reshape(-1, 1) - conv.mean_rho.view(1, -1)) ** 2
    w_rho = torch.exp(-0.5 * diff / (1e-14 + conv.precision_rho.view(1, -1) ** 2))
    first = torch.abs(theta.reshape(-1, 1) - conv.mean_theta.view(1, -1))
    second = torch.abs(2 * math.pi - first)
    w_theta = torch.exp(-0.5 * torch.min(first, second) ** 2 / (1e-14 + conv.precision_theta.view(1, -1) ** 2))
    w = w_rho * w_theta
    w[torch.isnan(w)] = 0
    return w / w.sum(dim=1, keepdim=True)


def pseudo_coords(boxes: torch.Tensor) -> torch.Tensor:
    """(B, R, 4) boxes -> (B, R, R, 2) polar (rho, theta) of centre_r - centre_s."""
    size = boxes[:, :, 2:] - boxes[:, :, :2]
    centre = boxes[:, :, :2] + 0.5 * size
    r = centre.shape[1]
    delta = centre.view(-1, r, 1, 2) - centre.view(-1, 1, r, 2)
    rho = torch.sqrt(delta[..., 0] ** 2 + delta[..., 1] ** 2)
    theta = torch.atan2(delta[..., 0], delta[..., 1])
    return torch.stack([rho, theta], -1)


def build_sparse_graph(dep: Sequence[Sequence[int]], n: int) -> torch.Tensor:
    adj = torch.zeros(n, n)
    for i, pair in enumerate(dep):
        if i == 0 or pair[0] >= n or pair[1] >= n:
            continue
        adj[pair[0], pair[1]] = 1
        adj[pair[1], pair[0]] = 1
    return adj + torch.eye(n)


def reference_scores(model: Gsmn, images: torch.Tensor, boxes: torch.Tensor, words: torch.Tensor,
                     lengths: Sequence[int], depends: Sequence | None = None, shard: int = 80) -> torch.Tensor:
    """(N_img, N_cap) scores by the port of the original loop: shards of images x captions, one caption at a time.

    images: (N_img, R, d) encoded regions; boxes (N_img, R, 4) normalised; words (N_cap, L, d) encoded words.
    Differentiable: with autograd on, gradients reach the inputs and the model's graph and head weights.
    """
    cfg = model.cfg
    chunk = cfg.embed_dim // cfg.num_block
    lam = cfg.lambda_softmax
    vconv, tconv = model.i2t_graph.conv, model.t2i_graph.conv
    n_img, n_cap = len(images), len(words)
    out = torch.zeros(n_img, n_cap, dtype=images.dtype)
    for i0 in range(0, n_img, shard):
        ims, bbx = images[i0 : i0 + shard], boxes[i0 : i0 + shard]
        b, r = ims.shape[0], ims.shape[1]
        coords = pseudo_coords(bbx)
        for c in range(n_cap):
            n = int(lengths[c])
            cap = words[c : c + 1, :n].contiguous()
            cap_rep = cap.repeat(b, 1, 1)
            # visual graph: regions query words, neighbours carry the node's own vector
            attn = _inter_relations(cap_rep, ims, lam)  # (b, R, n)
            mv = _block_cos(ims, attn, cap_rep, chunk)  # (b, R, 16)
            neigh = mv.unsqueeze(2).repeat(1, 1, r, 1).view(b * r, r, -1)
            w = gaussian_weights(vconv, coords[..., 0], coords[..., 1]).view(b * r, r, -1)
            hidden = _kernel_linear(torch.bmm(w.transpose(1, 2), neigh), vconv.conv_weights)
            score_v = _head(hidden, model.i2t_graph.head, b)
            # textual graph: words query regions
            intra = torch.softmax(torch.bmm(cap, cap.transpose(1, 2)).view(n, n) * lam, dim=1).view(1, n, n, 1)
            attn = _inter_relations(ims, cap_rep, lam)  # (b, n, R)
            mt = _block_cos(cap_rep, attn, ims, chunk).unsqueeze(2)  # (b, n, 1, 16)
            if not cfg.sparse:
                neigh = mt.repeat(1, 1, n, 1)
                nw = intra.repeat(b, 1, 1, 1)
            else:
                adj = build_sparse_graph(depends[c], n).view(1, n, n, 1)
                neigh = adj * mt
                nw = _l2norm(adj * intra, 2).repeat(b, 1, 1, 1)
            tw = (nw.reshape(-1, 1) * tconv.params.view(1, -1)).view(b * n, n, -1)
            tw = tw / tw.sum(dim=1, keepdim=True)
            hidden = _kernel_linear(torch.bmm(tw.transpose(1, 2), neigh.reshape(b * n, n, -1)), tconv.conv_weights)
            score_t = _head(hidden, model.t2i_graph.head, b)
            out[i0 : i0 + b, c] = (score_v + score_t)[:, 0]
    return out
