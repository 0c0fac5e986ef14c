"""Graph structured matching (GSMN) for every image x caption pair of a tile at once.

Node level (as upstream `inter_relations` + multi-block cosine): with raw scores s_rl = LeakyReLU_0.1(<v_r, w_l>),

* regions query words: s normalised over the regions of each word, softmax over words (temperature lambda),
  attended word vector c_r; m^v_r = blockcos(v_r, c_r)  (K blocks of d/K dims)
* words query regions: s normalised over the words of each region, softmax over regions; m^t_l = blockcos(w_l, c_l)

Structure level: each node's matching vector is scaled per kernel by a coefficient that depends on one side only
(`PolarGaussianKernels.node_coefficients` for regions, `WordGraphKernels.node_coefficients` for words), mapped
by the per-kernel Linear layers, then a weight-normed 32 -> 32 -> 1 head with tanh, averaged over nodes. The
score is the visual plus the textual graph score.

The original loops over captions and materialises the attended vectors. Here one tile is scored from per-block
dot products (one batched matrix product gives all of them; their sum over blocks is the raw score) and Gram
matrices: with attention alpha over context items x_s, <q_b, sum_s alpha_s x_sb> = sum_s alpha_s <q_b, x_sb> and
||sum_s alpha_s x_sb||^2 = alpha^T G_b alpha, G_b = X_b X_b^T, so no (pair, node, d) tensor is ever formed.
At the structure level the coefficient scaling, the kernel maps and out_1 fold into one small matrix per node
(`_folded_head_input`), and tanh is evaluated as 2 sigmoid(2x) - 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-8  # upstream: l2norm adds 1e-8 to the norm, the cosine clamps the norm product at 1e-8
# Attention weights are kept scaled by 2^32: softmax weights reach e^(-2 lambda) / n, and the products of two of
# them in the quadratic forms a^T G a below would otherwise fall into float32 subnormals, whose arithmetic is far
# slower on x86 CPUs. A cosine does not depend on the scale of the attended vector, so only its clamp threshold
# scales along; a power of two scales exactly.
ALPHA_SCALE = 2.0**32


class WeightNormLinear(nn.Module):
    """Linear layer with legacy weight normalisation, w = g * v / ||v|| per output row (`weight_norm(dim=0)`).

    Parameters keep the names torch 1.x gave them (`weight_g` (out, 1), `weight_v` (out, in), `bias`), the names
    in the originals' checkpoints; initialised like `weight_norm(nn.Linear(...))` (g = row norms of v).
    """

    def __init__(self, in_dim: int, out_dim: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        lin = nn.Linear(in_dim, out_dim, device=device, dtype=dtype)
        self.weight_g = nn.Parameter(lin.weight.detach().norm(dim=1, keepdim=True))
        self.weight_v = nn.Parameter(lin.weight.detach().clone())
        self.bias = nn.Parameter(lin.bias.detach().clone())

    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


class MatchHead(nn.Module):
    """out_2(tanh(out_1(h))): weight-normed 32 -> 32 -> 1 (upstream `out_1`, `out_2`)."""

    def __init__(self, hid_dim: int = 32, out_dim: int = 1, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.out_1 = WeightNormLinear(hid_dim, hid_dim, device=device, dtype=dtype)
        self.out_2 = WeightNormLinear(hid_dim, out_dim, device=device, dtype=dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out_2(torch.tanh(self.out_1(h)))


def sparse_adjacency(pairs: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    """(length, length) word graph from dependency pairs, exactly as upstream `build_sparse_graph`.

    The first pair (CoreNLP's ROOT edge) is skipped, pairs with an index >= length are dropped, every kept
    pair links both ways, then the identity is added (a self-dependency gives a diagonal 2, as upstream).
    """
    adj = torch.zeros(length, length)
    for k, pair in enumerate(pairs):
        g, d = int(pair[0]), int(pair[1])
        if k == 0 or g >= length or d >= length:
            continue
        adj[g, d] = 1.0
        adj[d, g] = 1.0
    return adj + torch.eye(length)


class WordGraphKernels(nn.Module):
    """GSMN's `TextQueryGraphConvolution`: K scalar kernels on word-graph edge weights + one Linear per kernel.

    Upstream passes `2` into the `bias` slot, so these Linear layers have biases (the visual ones do not).
    """

    def __init__(self, in_dim: int, out_dim: int, n_kernels: int = 8, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.n_kernels = n_kernels
        self.conv_weights = nn.ModuleList(
            nn.Linear(in_dim, out_dim // n_kernels, bias=True, **dd) for _ in range(n_kernels))
        self.params = nn.Parameter(torch.empty(n_kernels, 1, **dd).uniform_(-1.0, 1.0))

    def node_coefficients(self, words: torch.Tensor, lengths: torch.Tensor, lambda_softmax: float,
                          adjacency: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, d) word features -> (B, L, K) coefficients c_ik = sum_j omega_ijk A_ij (0 beyond each length).

        a = softmax_j(lambda W W^T) over the caption's words (upstream `intra_relations`); dense: n = a, A = 1;
        sparse (`adjacency` (B, L, L), zero-padded): n = l2norm_j(A * a) with eps 1e-8. omega_ijk = n_ij p_k /
        sum_j n_ij p_k. Upstream's neighbour features are f_ij = A_ij m_i, so node i's kernel k gets c_ik * m_i.
        """
        b, L, _ = words.shape
        valid = torch.arange(L, device=words.device)[None, :] < lengths.to(words.device)[:, None]  # (B, L)
        logits = lambda_softmax * (words @ words.transpose(1, 2))
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
        a = torch.softmax(logits, dim=-1)  # (B, L, L), rows of padded words are junk, masked below
        if adjacency is None:
            n, support = a, valid[:, None, :].to(words.dtype).expand(b, L, L)
        else:
            masked = adjacency * a
            n = masked / (torch.linalg.vector_norm(masked, dim=-1, keepdim=True) + EPS)
            support = adjacency
        w = n[..., None] * self.params.view(-1)  # (B, L, L, K)
        denom = w.sum(2, keepdim=True)
        # rows of padded words are all zero: divide them by 1, since a 0/0 even if masked poisons the gradient
        denom = torch.where(valid[:, :, None, None], denom, torch.ones_like(denom))
        coef = (w / denom * support[..., None]).sum(2)  # (B, L, K)
        return torch.where(valid[..., None], coef, torch.zeros_like(coef))

    def stacked_weight(self) -> torch.Tensor:
        return torch.cat([lin.weight for lin in self.conv_weights], 0)

    def stacked_bias(self) -> torch.Tensor:
        return torch.cat([lin.bias for lin in self.conv_weights], 0)


def _folded_head_input(coef: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, head: MatchHead,
                       n_kernels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-node matrices M_n (nodes, hid, K_blocks) and the bias b' (hid,) with out_1(h_n) = M_n m + b'.

    h_n = concat_k (c_nk U_k m (+ b_k)) with the kernel maps U_k (out/n_kernels rows of `weight` each), so with
    out_1 = W_1 . + b_1: out_1(h_n) = sum_k c_nk (W_1[:, k] U_k) m + (W_1 b + b_1) (W_1[:, k]: kernel k's columns).
    The n_kernels products B_k = W_1[:, k] U_k are formed once; M_n = sum_k c_nk B_k is one small matrix product,
    which replaces the out-dim map, the coefficient scaling, the bias and the out_1 map of every pair.
    """
    w1 = head.out_1.weight().to(coef.dtype)  # (hid, out)
    hid, out = w1.shape
    group = out // n_kernels
    u = weight.to(coef.dtype).view(n_kernels, group, -1)  # (n_kernels, group, K_blocks)
    b_k = torch.bmm(w1.view(hid, n_kernels, group).transpose(0, 1), u)  # (n_kernels, hid, K_blocks)
    maps = (coef.reshape(-1, n_kernels) @ b_k.reshape(n_kernels, -1)).view(-1, hid, u.shape[-1])
    shift = head.out_1.bias.to(coef.dtype)
    if bias is not None:
        shift = shift + w1 @ bias.to(coef.dtype)
    return maps, shift


def _node_scores(match: torch.Tensor, maps: torch.Tensor, shift: torch.Tensor, head: MatchHead,
                 inplace: bool) -> torch.Tensor:
    """(nodes, X) per-node scores w_2 . tanh(M_n m_nx + b') (out_2's bias left out); match (nodes, K_blocks, X).

    tanh(z) = 2 sigmoid(2z) - 1 (the vectorised sigmoid is several times faster than tanh on CPUs).
    """
    z = torch.baddbmm(shift[None, :, None], maps, match, alpha=2.0, beta=2.0)  # 2 (M_n m + b'), (nodes, hid, X)
    t = torch.sigmoid_(z) if inplace else torch.sigmoid(z)
    t = t.mul_(2.0).sub_(1.0) if inplace else 2.0 * t - 1.0
    w2 = head.out_2.weight().to(t.dtype)[0]  # (hid,)
    return torch.matmul(w2, t)  # (nodes, X)


def _block_gram(x: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """(B, n, d) items -> (B, K*n, n): per block k the Gram matrix G_k = X_k X_k^T, stacked over blocks."""
    b, n, d = x.shape
    xb = x.reshape(b, n, n_blocks, d // n_blocks).transpose(1, 2).contiguous()  # (B, K, n, blk), fast operands
    return (xb @ xb.transpose(-1, -2)).view(b, n_blocks * n, n)


def _norm(x: torch.Tensor, dim: int, inplace: bool) -> torch.Tensor:
    """L2 norm over `dim` (keepdim); without autograd as sqrt(sum x^2), whose reduction runs faster."""
    if inplace:
        return x.square().sum(dim, keepdim=True).sqrt_()
    return torch.linalg.vector_norm(x, dim=dim, keepdim=True)  # its gradient at 0 is 0, sqrt's is not


class CaptionTile(NamedTuple):
    """What `gsmn_tile_scores` needs of a tile's captions, independent of the images (computed once per tile)."""

    words: torch.Tensor  # (Nc, L, d), zero past each length
    mask: torch.Tensor  # (Nc, L), 1 on the caption's words
    gram: torch.Tensor  # (Nc, K*L, L) per-block Gram matrices
    norms: torch.Tensor  # (Nc*L, K) per-block word norms
    maps: torch.Tensor  # (Nc*L, hid, K) and shift (hid,): the textual head's folded input (`_folded_head_input`)
    shift: torch.Tensor
    mean_w: torch.Tensor  # (Nc, L), 1/length on the caption's words


def prepare_captions(captions: torch.Tensor, caption_coef: torch.Tensor, lengths: torch.Tensor, *, n_blocks: int,
                     textual: tuple[torch.Tensor, torch.Tensor | None, MatchHead], n_kernels: int) -> CaptionTile:
    """The caption side of a tile (see `gsmn_tile_scores`), to share between the tiles of an image gallery."""
    nc, L, d = captions.shape
    valid = torch.arange(L, device=captions.device)[None, :] < lengths.to(captions.device)[:, None]  # (Nc, L)
    mask = valid.to(captions.dtype)
    words = captions * mask[..., None]
    weight, bias, head = textual
    maps, shift = _folded_head_input(caption_coef.to(words.dtype), weight, bias, head, n_kernels)
    return CaptionTile(words, mask, _block_gram(words, n_blocks),
                       words.reshape(nc * L, n_blocks, d // n_blocks).norm(dim=-1), maps, shift,
                       mask / lengths.to(mask.device, mask.dtype)[:, None])


class ImageTile(NamedTuple):
    """What `gsmn_tile_scores` needs of a tile's images, independent of the captions (computed once per tile)."""

    gram: torch.Tensor  # (Ni, K*R, R) per-block Gram matrices of the regions
    norms: torch.Tensor  # (Ni*R, K) per-block region norms
    maps: torch.Tensor  # (Ni*R, hid, K) and shift (hid,): the visual head's folded input (`_folded_head_input`)
    shift: torch.Tensor

    def rows(self, start: int, stop: int) -> ImageTile:
        """Images start..stop-1 (views, no copy)."""
        r = self.gram.shape[-1]
        return ImageTile(self.gram[start:stop], self.norms[start * r : stop * r], self.maps[start * r : stop * r],
                         self.shift)


def prepare_images(images: torch.Tensor, image_coef: torch.Tensor, *, n_blocks: int,
                   visual: tuple[torch.Tensor, torch.Tensor | None, MatchHead], n_kernels: int) -> ImageTile:
    """The image side of a tile (see `gsmn_tile_scores`), to share between the caption tiles of a gallery."""
    ni, r, d = images.shape
    weight, bias, head = visual
    maps, shift = _folded_head_input(image_coef.to(images.dtype), weight, bias, head, n_kernels)
    return ImageTile(_block_gram(images, n_blocks), images.reshape(ni * r, n_blocks, d // n_blocks).norm(dim=-1),
                     maps, shift)


def gsmn_tile_scores(images: torch.Tensor, image_coef: torch.Tensor, captions: torch.Tensor,
                     caption_coef: torch.Tensor, lengths: torch.Tensor, *, n_blocks: int, lambda_softmax: float,
                     visual: tuple[torch.Tensor, torch.Tensor | None, MatchHead],
                     textual: tuple[torch.Tensor, torch.Tensor | None, MatchHead], n_kernels: int,
                     prepared: CaptionTile | None = None, prepared_images: ImageTile | None = None) -> torch.Tensor:
    """(Ni, Nc) GSMN scores of one tile.

    Args:
        images: (Ni, R, d) region features; image_coef (Ni, R, K) from `PolarGaussianKernels.node_coefficients`.
        captions: (Nc, L, d) word features (positions >= length ignored); caption_coef (Nc, L, K).
        lengths: (Nc,) words per caption.
        visual / textual: (stacked kernel weight (out, n_blocks), stacked bias or None, head) of each graph.
        prepared: `prepare_captions` of these captions, when the caller scores them against several image tiles.
        prepared_images: `prepare_images` of these images, when the caller scores them against several caption tiles.

    The squared norms of the attended blocks, a^T G_k a, come from one batched product G a laid out so that the
    reduction a^T (G a) runs over a middle dimension (contiguous rows, vectorised).
    """
    ni, r, d = images.shape
    nc, L, _ = captions.shape
    blk = d // n_blocks
    if prepared is None:
        prepared = prepare_captions(captions, caption_coef, lengths, n_blocks=n_blocks, textual=textual,
                                    n_kernels=n_kernels)
    if prepared_images is None:
        prepared_images = prepare_images(images, image_coef, n_blocks=n_blocks, visual=visual, n_kernels=n_kernels)
    captions, vmask = prepared.words, prepared.mask
    vb = images.reshape(ni * r, n_blocks, blk).transpose(0, 1)  # (K, Ni*R, blk)
    wb = captions.reshape(nc * L, n_blocks, blk).permute(1, 2, 0)  # (K, blk, Nc*L)
    dots_b = torch.bmm(vb, wb)  # (K, Ni*R, Nc*L) per-block region-word dot products
    s = F.leaky_relu(dots_b.sum(0), 0.1).view(ni, r, nc, L)
    # without autograd the last reader of dots_b may overwrite it (memory traffic bounds this part on CPUs)
    inplace = not (torch.is_grad_enabled() and (images.requires_grad or captions.requires_grad))

    # Regions query words: normalise over regions, softmax over the caption's words.
    x = s / (_norm(s, 1, inplace) + EPS)
    e = torch.exp(lambda_softmax * x) * vmask[None, None]
    z = e.sum(-1, keepdim=True) / ALPHA_SCALE
    alpha = e.div_(z) if inplace else e / z  # (Ni, R, Nc, L), ALPHA_SCALE times the softmax
    prod = dots_b.view(n_blocks, ni * r, nc, L) * alpha.view(ni * r, nc, L)
    num = (prod.view(-1, L) @ vmask.new_ones(L)).view(n_blocks, ni * r, nc)  # sum over words as a matvec
    a_c = alpha.permute(2, 3, 0, 1).reshape(nc, L, ni * r)
    ga = torch.bmm(prepared.gram, a_c).view(nc, n_blocks, L, ni * r)
    ctx_sq = (ga.mul_(a_c[:, None]) if inplace else ga * a_c[:, None]).sum(2).clamp(min=0)  # (Nc, K, Ni*R)
    q_norm = prepared_images.norms  # (Ni*R, K)
    den = (q_norm.T[:, :, None] * ctx_sq.permute(1, 2, 0).sqrt()).clamp(min=EPS * ALPHA_SCALE)  # (K, Ni*R, Nc)
    m_v = (num.div_(den) if inplace else num / den).transpose(0, 1).contiguous()  # (Ni*R, K, Nc)
    head = visual[2]
    node = _node_scores(m_v, prepared_images.maps, prepared_images.shift, head, inplace)  # (Ni*R, Nc)
    score_v = node.view(ni, r, nc).mean(1) + head.out_2.bias.to(node.dtype)  # (Ni, Nc)

    # Words query regions: normalise over the caption's words, softmax over regions.
    x = s / (_norm(s, -1, inplace) + EPS)
    e = torch.exp(lambda_softmax * x)
    z = e.sum(1, keepdim=True) / ALPHA_SCALE
    alpha = e.div_(z) if inplace else e / z  # (Ni, R, Nc, L), ALPHA_SCALE times the softmax
    a_i = alpha.view(ni, r, nc * L)
    prod = dots_b.view(n_blocks, ni, r, nc * L)
    num = (prod.mul_(a_i) if inplace else prod * a_i).sum(2)  # (K, Ni, Nc*L)
    ga = torch.bmm(prepared_images.gram, a_i).view(ni, n_blocks, r, nc * L)
    ctx_sq = (ga.mul_(a_i[:, None]) if inplace else ga * a_i[:, None]).sum(2).clamp(min=0)  # (Ni, K, Nc*L)
    den = (prepared.norms.T[:, None, :] * ctx_sq.transpose(0, 1).sqrt()).clamp(min=EPS * ALPHA_SCALE)  # (K, Ni, Nc*L)
    m_t = (num.div_(den) if inplace else num / den).permute(2, 0, 1).contiguous()  # (Nc*L, K, Ni)
    head = textual[2]
    node = _node_scores(m_t, prepared.maps, prepared.shift, head, inplace).view(nc, L, ni)
    score_t = (node * prepared.mean_w[..., None]).sum(1).T + head.out_2.bias.to(node.dtype)
    return score_v + score_t


def tile_bytes_per_pair(regions: int, words: int, n_blocks: int, itemsize: int) -> int:
    """Rough size of the live intermediates of one pair in `gsmn_tile_scores` (tiling only)."""
    return (2 * n_blocks + 8) * regions * max(words, 1) * itemsize + 64 * (regions + words) * itemsize


def gsmn_tiles(n_images: int, n_captions: int, regions: int, words: int, n_blocks: int, itemsize: int,
               budget_mb: float) -> tuple[int, int]:
    """Images x captions per tile within `budget_mb` of intermediates (changes speed, never scores).

    Tiles hold about as many regions as words (Ni R ~ Nc L): the per-block region-word products are square-ish
    matrix products, and the per-image Gram matrices (R^2 d each, recomputed per tile) are shared by more captions.
    """
    pairs = max(1, int(budget_mb * 2**20 // tile_bytes_per_pair(regions, words, n_blocks, itemsize)))
    tc = min(n_captions, max(1, round(math.sqrt(pairs * regions / max(words, 1)))))
    ti = min(n_images, max(1, pairs // tc))
    if ti == n_images:
        tc = min(n_captions, max(1, pairs // ti))
    return ti, tc
