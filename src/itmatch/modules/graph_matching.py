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
||sum_s alpha_s x_sb||^2 = alpha^T G_b alpha, G_b = X_b X_b^T, so no (pair, node, d) tensor is ever formed; G_b is
symmetric, so the quadratic form is a sum over the pairs s <= t of the upper triangle times alpha_s alpha_t.
At the structure level the coefficient scaling, the kernel maps and out_1 fold into one small matrix per node
(`fold_head`), and tanh is evaluated as 2 sigmoid(2x) - 1.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from itmatch.modules.norm import EPS  # upstream: l2norm adds it to the norm, the cosine clamps the norm product at it
from itmatch.modules.workspace import Workspace

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


class FoldedHead(NamedTuple):
    """One side's structure-level head with its graph folded in (`fold_head`): per node, score =
    w . sigmoid(2 (M_n m + b')), averaged over nodes, plus `const` (= w_2 . tanh(M_n m + b') + out_2's bias)."""

    maps: torch.Tensor  # (nodes, K_blocks, hid): M_n^T
    shift: torch.Tensor  # (hid,): b'
    w: torch.Tensor  # (hid,): 2 w_2
    const: torch.Tensor  # (): out_2's bias - sum(w_2)


def fold_head(coef: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, head: MatchHead,
              n_kernels: int) -> FoldedHead:
    """Per-node matrices M_n and the bias b' with out_1(h_n) = M_n m + b', and out_2 in sigmoid form.

    h_n = concat_k (c_nk U_k m (+ b_k)) with the kernel maps U_k (out/n_kernels rows of `weight` each), so with
    out_1 = W_1 . + b_1: out_1(h_n) = sum_k c_nk (W_1[:, k] U_k) m + (W_1 b + b_1) (W_1[:, k]: kernel k's columns).
    The n_kernels products B_k = W_1[:, k] U_k are formed once; M_n = sum_k c_nk B_k is one small matrix product,
    which replaces the out-dim map, the coefficient scaling, the bias and the out_1 map of every pair. With
    tanh(z) = 2 sigmoid(2z) - 1 (the vectorised sigmoid is several times faster than tanh on CPUs),
    w_2 . tanh(z) + b_2 = 2 w_2 . sigmoid(2z) + (b_2 - sum(w_2)).
    """
    w1 = head.out_1.weight().to(coef.dtype)  # (hid, out)
    hid, out = w1.shape
    group = out // n_kernels
    u = weight.to(coef.dtype).view(n_kernels, group, -1)  # (n_kernels, group, K_blocks)
    b_k = torch.bmm(u.transpose(1, 2), w1.view(hid, n_kernels, group).permute(1, 2, 0))  # (n_kernels, K_blocks, hid)
    maps = (coef.reshape(-1, n_kernels) @ b_k.reshape(n_kernels, -1)).view(-1, u.shape[-1], hid)
    shift = head.out_1.bias.to(coef.dtype)
    if bias is not None:
        shift = shift + w1 @ bias.to(coef.dtype)
    w2 = head.out_2.weight().to(coef.dtype)[0]  # (hid,)
    return FoldedHead(maps, shift, 2.0 * w2, head.out_2.bias.to(coef.dtype)[0] - w2.sum())


def _node_scores(match: torch.Tensor, head: FoldedHead, ws: Workspace | None) -> torch.Tensor:
    """(nodes, X) per-node scores w . sigmoid(2 (M_n m_nx + b')) of `FoldedHead`; match (nodes, X, K_blocks)."""
    if ws is None:
        t = torch.sigmoid(torch.baddbmm(head.shift, match, head.maps, alpha=2.0, beta=2.0))  # (nodes, X, hid)
    else:
        z = ws.take("head", (*match.shape[:2], head.maps.shape[-1]), match)
        t = torch.baddbmm(head.shift, match, head.maps, alpha=2.0, beta=2.0, out=z).sigmoid_()
    return t @ head.w  # one matrix-vector product over contiguous rows of hid values


def _block_gram(x: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """(B, n, d) items -> (B, K*n, n): per block k the Gram matrix G_k = X_k X_k^T, stacked over blocks."""
    b, n, d = x.shape
    xb = x.reshape(b, n, n_blocks, d // n_blocks).transpose(1, 2).contiguous()  # (B, K, n, blk), fast operands
    return (xb @ xb.transpose(-1, -2)).view(b, n_blocks * n, n)


@functools.lru_cache(maxsize=256)
def _triangle(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the upper triangle (i <= j) of an n x n matrix, `torch.triu_indices` order.

    Made outside inference mode: a cached index first asked for during evaluation must still serve training (an
    inference tensor cannot be saved for backward; GSMN's second epoch failed on a caption length first seen by
    the dev evaluation)."""
    with torch.inference_mode(False):
        iu, ju = torch.triu_indices(n, n, device=device)
    return iu, ju


def _triangle_gram(x: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """(B, n, d) items -> (B, K, n(n+1)/2): the upper triangles (i <= j) of the per-block Gram matrices.

    The off-diagonal entries are doubled, so that a^T G_k a = sum_p T[k, p] a_i a_j over the same pairs p = (i, j),
    in `torch.triu_indices` order (`_attended_sq_norms`).
    """
    b, n, _ = x.shape
    iu, ju = _triangle(n, x.device)
    tri = _block_gram(x, n_blocks).view(b, n_blocks, n, n)[:, :, iu, ju]
    return tri * torch.where(iu == ju, 1.0, 2.0).to(tri.dtype)


def _attended_sq_norms(tri: torch.Tensor, a: torch.Tensor, ws: Workspace | None) -> torch.Tensor:
    """(B, K, n(n+1)/2) Gram triangles (`_triangle_gram`), (B, n, M) weights -> (B, K, M) squared norms a^T G_k a.

    One batched product of the triangles with the pair products a_i a_j (i <= j): about half the work of G_k a,
    and its result needs no further reduction. Rounding can leave a norm of zero slightly negative: clamped at 0.
    """
    iu, ju = _triangle(a.shape[1], a.device)
    if ws is None:
        pairs = torch.index_select(a, 1, iu) * torch.index_select(a, 1, ju)
        return torch.bmm(tri, pairs).clamp(min=0)
    shape = (a.shape[0], len(iu), a.shape[2])
    pairs = torch.index_select(a, 1, iu, out=ws.take("pairs", shape, a))
    pairs.mul_(torch.index_select(a, 1, ju, out=ws.take("pairs_j", shape, a)))
    return torch.bmm(tri, pairs).clamp_(min=0)


def _scale(s: torch.Tensor, dim: int, lambda_softmax: float, grad: bool) -> torch.Tensor:
    """lambda / (||s|| + eps) over `dim` (keepdim): upstream's l2norm before its temperature softmax.

    Without autograd as sqrt(sum s^2), whose reduction runs faster than `vector_norm` (whose gradient at 0 is 0,
    where sqrt's is not).
    """
    if grad:
        return lambda_softmax / (torch.linalg.vector_norm(s, dim=dim, keepdim=True) + EPS)
    return s.square().sum(dim, keepdim=True).sqrt_().add_(EPS).reciprocal_().mul_(lambda_softmax)


class CaptionTile(NamedTuple):
    """What `gsmn_tile_scores` needs of a tile's captions, independent of the images (computed once per tile)."""

    words: torch.Tensor  # (Nc, L, d), zero past each length
    mask: torch.Tensor  # (Nc, L, 1, 1), 1 on the caption's words
    gram: torch.Tensor  # (Nc, K, L(L+1)/2) per-block Gram matrices as `_triangle_gram`
    norms: torch.Tensor  # (K, Nc*L) per-block word norms
    head: FoldedHead  # the textual graph's head, nodes = Nc*L words
    mean_w: torch.Tensor  # (Nc, L, 1), 1/length on the caption's words


def prepare_captions(captions: torch.Tensor, caption_coef: torch.Tensor, lengths: torch.Tensor, *, n_blocks: int,
                     textual: tuple[torch.Tensor, torch.Tensor | None, MatchHead], n_kernels: int) -> CaptionTile:
    """The caption side of a tile (see `gsmn_tile_scores`), to share between the tiles of an image gallery."""
    nc, L, d = captions.shape
    valid = torch.arange(L, device=captions.device)[None, :] < lengths.to(captions.device)[:, None]  # (Nc, L)
    mask = valid.to(captions.dtype)
    words = captions * mask[..., None]
    weight, bias, head = textual
    return CaptionTile(words, mask[..., None, None], _triangle_gram(words, n_blocks),
                       words.reshape(nc * L, n_blocks, d // n_blocks).norm(dim=-1).T.contiguous(),
                       fold_head(caption_coef.to(words.dtype), weight, bias, head, n_kernels),
                       (mask / lengths.to(mask.device, mask.dtype)[:, None])[..., None])


class ImageTile(NamedTuple):
    """What `gsmn_tile_scores` needs of a tile's images, independent of the captions (computed once per tile)."""

    gram: torch.Tensor  # (Ni, K, R(R+1)/2) per-block Gram matrices of the regions as `_triangle_gram`
    norms: torch.Tensor  # (K, Ni*R) per-block region norms
    head: FoldedHead  # the visual graph's head, nodes = Ni*R regions

    def split(self, size: int) -> list[ImageTile]:
        """Tiles of `size` images (views, no copy; under autograd one backward per split, not one per tile)."""
        r = self.norms.shape[1] // self.gram.shape[0]
        parts = zip(self.gram.split(size), self.norms.split(size * r, dim=1), self.head.maps.split(size * r),
                    strict=True)
        return [ImageTile(gram, norms, self.head._replace(maps=maps)) for gram, norms, maps in parts]


def prepare_images(images: torch.Tensor, image_coef: torch.Tensor, *, n_blocks: int,
                   visual: tuple[torch.Tensor, torch.Tensor | None, MatchHead], n_kernels: int) -> ImageTile:
    """The image side of a tile (see `gsmn_tile_scores`), to share between the caption tiles of a gallery."""
    ni, r, d = images.shape
    weight, bias, head = visual
    return ImageTile(_triangle_gram(images, n_blocks),
                     images.reshape(ni * r, n_blocks, d // n_blocks).norm(dim=-1).T.contiguous(),
                     fold_head(image_coef.to(images.dtype), weight, bias, head, n_kernels))


def gsmn_tile_scores(images: torch.Tensor, image_coef: torch.Tensor, captions: torch.Tensor,
                     caption_coef: torch.Tensor, lengths: torch.Tensor, *, n_blocks: int, lambda_softmax: float,
                     visual: tuple[torch.Tensor, torch.Tensor | None, MatchHead],
                     textual: tuple[torch.Tensor, torch.Tensor | None, MatchHead], n_kernels: int,
                     prepared: CaptionTile | None = None, prepared_images: ImageTile | None = None,
                     workspace: Workspace | None = None) -> torch.Tensor:
    """(Ni, Nc) GSMN scores of one tile.

    Args:
        images: (Ni, R, d) region features; image_coef (Ni, R, K) from `PolarGaussianKernels.node_coefficients`.
        captions: (Nc, L, d) word features (positions >= length ignored); caption_coef (Nc, L, K).
        lengths: (Nc,) words per caption.
        visual / textual: (stacked kernel weight (out, n_blocks), stacked bias or None, head) of each graph.
        prepared: `prepare_captions` of these captions, when the caller scores them against several image tiles.
        prepared_images: `prepare_images` of these images, when the caller scores them against several caption tiles.
        workspace: scratch buffers shared by the caller's tiles; used only when no gradient is recorded.

    Region-word products are laid out (block, caption word, image region), so both directions reduce over a
    middle or the last dimension of contiguous rows. The squared norms of the attended vectors are one batched
    product each (`_attended_sq_norms`): the caption's Gram triangles with the pair products of the words'
    weights for the regions, the image's with those of the regions' weights for the words.
    """
    ni, r, d = images.shape
    nc, L, _ = captions.shape
    blk = d // n_blocks
    if prepared is None:
        prepared = prepare_captions(captions, caption_coef, lengths, n_blocks=n_blocks, textual=textual,
                                    n_kernels=n_kernels)
    if prepared_images is None:
        prepared_images = prepare_images(images, image_coef, n_blocks=n_blocks, visual=visual, n_kernels=n_kernels)
    words = prepared.words
    grad = torch.is_grad_enabled() and (images.requires_grad or words.requires_grad)
    # Without autograd, intermediates are overwritten by their last reader and the large ones live in `ws`.
    ws = None if grad else (workspace if workspace is not None else Workspace())
    wb = words.view(nc * L, n_blocks, blk).transpose(0, 1)  # (K, Nc*L, blk)
    vb = images.reshape(ni * r, n_blocks, blk).permute(1, 2, 0)  # (K, blk, Ni*R)
    shape = (n_blocks, nc * L, ni * r)
    dots_b = torch.bmm(wb, vb) if ws is None else torch.bmm(wb, vb, out=ws.take("dots", shape, images))
    s = F.leaky_relu(dots_b.sum(0), 0.1).view(nc, L, ni, r)  # dots_b: per-block word-region dot products

    # Regions query words: normalise over the image's regions, softmax over the caption's words.
    e = torch.exp(s * _scale(s, -1, lambda_softmax, grad)) * prepared.mask
    z = e.sum(1, keepdim=True) / ALPHA_SCALE
    alpha = (e / z if grad else e.div_(z)).view(nc, L, ni * r)  # ALPHA_SCALE times the softmax
    dots_v = dots_b.view(n_blocks, nc, L, ni * r)
    prod = dots_v * alpha if ws is None else torch.mul(dots_v, alpha, out=ws.take("prod", dots_v.shape, images))
    num = prod.sum(2)  # (K, Nc, Ni*R)
    ctx = _attended_sq_norms(prepared.gram, alpha, ws).sqrt()  # (Nc, K, Ni*R)
    den = (prepared_images.norms * ctx).clamp(min=EPS * ALPHA_SCALE).transpose(0, 1)
    m_v = (num / den if grad else num.div_(den)).permute(2, 1, 0).contiguous()  # (Ni*R, Nc, K)
    score_v = _node_scores(m_v, prepared_images.head, ws).view(ni, r, nc).mean(1)  # (Ni, Nc)

    # Words query regions: normalise over the caption's words, softmax over the image's regions.
    e = torch.exp(s * _scale(s, 1, lambda_softmax, grad))
    z = e.sum(-1, keepdim=True) / ALPHA_SCALE
    beta = e / z if grad else e.div_(z)  # (Nc, L, Ni, R), ALPHA_SCALE times the softmax
    prod = dots_b.view(n_blocks, nc * L * ni, r)
    prod = prod * beta.view(-1, r) if grad else prod.mul_(beta.view(-1, r))
    num = (prod @ beta.new_ones(r)).view(n_blocks, nc * L, ni)  # sum over regions as a matvec
    b_i = beta.view(nc * L, ni, r).permute(1, 2, 0).contiguous()  # (Ni, R, Nc*L), contiguous for index_select
    ctx = _attended_sq_norms(prepared_images.gram, b_i, ws).sqrt()  # (Ni, K, Nc*L)
    den = (prepared.norms * ctx).clamp(min=EPS * ALPHA_SCALE).permute(1, 2, 0)
    m_t = (num / den if grad else num.div_(den)).permute(1, 2, 0).contiguous()  # (Nc*L, Ni, K)
    node = _node_scores(m_t, prepared.head, ws).view(nc, L, ni)  # per word
    score_t = (node * prepared.mean_w).sum(1).T
    return score_v + score_t + (prepared_images.head.const + prepared.head.const)


def tile_bytes_per_pair(regions: int, words: int, n_blocks: int, itemsize: int) -> int:
    """Rough size of the live intermediates of one pair in `gsmn_tile_scores` (tiling only): two region-word
    products per block, and the pair products of the attention weights of both directions."""
    words = max(words, 1)
    return ((2 * n_blocks + 8) * regions * words + regions * words * (words + regions + 2) // 2
            + 64 * (regions + words)) * itemsize


def gsmn_tiles(n_images: int, n_captions: int, regions: int, words: int, n_blocks: int, itemsize: int,
               budget_mb: float) -> tuple[int, int]:
    """Images x captions per tile within `budget_mb` of intermediates (changes speed, never scores).

    Tiles hold about as many regions as words (Ni R ~ Nc L): the per-block region-word products are square-ish
    matrix products.
    """
    pairs = max(1, int(budget_mb * 2**20 // tile_bytes_per_pair(regions, words, n_blocks, itemsize)))
    tc = min(n_captions, max(1, round(math.sqrt(pairs * regions / max(words, 1)))))
    ti = min(n_images, max(1, pairs // tc))
    if ti == n_images:
        tc = min(n_captions, max(1, pairs // ti))
    return ti, tc
