"""HREM: pooling, transformer block, encoders, each loss term and the relation graph against hand-written
computations; the graph stays out of inference and checkpoints; presets, schedule and exact resume."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from itmatch.checkpoints import native
from itmatch.config import load_preset
from itmatch.errors import CheckpointError, ConfigError, DataError
from itmatch.losses import distance_weighted_triplet_loss, distance_weights
from itmatch.models.hrem import HremConfig
from itmatch.models.vse_infinity import VseInfinityConfig
from itmatch.modules.instance_graph import fragment_match, top_fraction
from itmatch.modules.pooling import masked_mean_pool, topk_mean_pool
from itmatch.modules.transformer import post_norm_encoder
from itmatch.registry import create_model
from itmatch.training import CHECKPOINT, _set_lr, fit
from tests.conftest import crash_and_resume, training_recipe
from tests.test_models import IMAGE_DIM, tiny_batch


def hrem_model(bert: Path, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    args = {"image_dim": IMAGE_DIM, "embed_dim": 16, "nhead": 2, "bert_path": str(bert), "relation_topk": 3} | kw
    return create_model(HremConfig(**args))


def hrem_recipe(model: torch.nn.Module):
    """HREM's training recipe for `model` (its instance graph in the model's train/eval mode)."""
    recipe = training_recipe(model)
    recipe.graph.train(model.training)
    return recipe


# ---------------------------------------------------------------- hand-written references (loops, no batching)

def hand_topk_mean(v: torch.Tensor, k: int) -> torch.Tensor:
    """(n, D) -> (D,): per dimension, sort descending and average the first k."""
    return torch.stack([v[:, d].sort(descending=True).values[:k].mean() for d in range(v.shape[1])])


def hand_layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def hand_layer(layer: torch.nn.TransformerEncoderLayer, x: torch.Tensor, bias: torch.Tensor | None = None):
    """One post-norm layer on one unpadded sequence x (n, D), optional additive attention bias (n, n)."""
    attn = layer.self_attn
    d, h = x.shape[1], attn.num_heads
    dh = d // h
    wq, wk, wv = attn.in_proj_weight.split(d)
    bq, bk, bv = attn.in_proj_bias.split(d)
    q, k, v = x @ wq.T + bq, x @ wk.T + bk, x @ wv.T + bv
    heads = []
    for i in range(h):
        s = slice(i * dh, (i + 1) * dh)
        logits = q[:, s] @ k[:, s].T / math.sqrt(dh)
        if bias is not None:
            logits = logits + bias
        heads.append(torch.softmax(logits, dim=-1) @ v[:, s])
    a = torch.cat(heads, dim=1) @ attn.out_proj.weight.T + attn.out_proj.bias
    x = hand_layer_norm(x + a, layer.norm1)
    ff = torch.relu(x @ layer.linear1.weight.T + layer.linear1.bias) @ layer.linear2.weight.T + layer.linear2.bias
    return hand_layer_norm(x + ff, layer.norm2)


def hand_embedding(x: torch.Tensor, layer: torch.nn.TransformerEncoderLayer) -> torch.Tensor:
    """HREM pooling of one unpadded set x (n, D): l2norm(0.8 top-2 mean + 0.2 mean of the transformer)."""
    mixed = 0.8 * hand_topk_mean(x, min(2, len(x))) + 0.2 * hand_layer(layer, x).mean(0)
    return mixed / (mixed.norm() + 1e-8)


# ---------------------------------------------------------------- pooling and transformer block

def test_topk_mean_pool_against_sorting_with_the_upstream_k_carry_over() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, generator=gen)
    lengths = torch.tensor([6, 1, 4, 3])
    carried = topk_mean_pool(x, lengths, 2)
    plain = topk_mean_pool(x, lengths, 2, carry_k=False)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(plain[i], hand_topk_mean(x[i, :n], min(2, n)))
        # upstream's loop overwrites k: after the 1-vector set every later row uses k = 1
        torch.testing.assert_close(carried[i], hand_topk_mean(x[i, :n], 2 if i == 0 else 1))
    torch.testing.assert_close(masked_mean_pool(x, lengths),
                               torch.stack([x[i, :n].mean(0) for i, n in enumerate(lengths.tolist())]))


@pytest.mark.parametrize("mode", ["eval", "train without dropout"])
def test_transformer_block_is_post_norm_relu_with_padding_masked(mode: str) -> None:
    torch.manual_seed(0)
    enc = post_norm_encoder(8, 2, 8, 0.0 if mode != "eval" else 0.1)
    enc.train(mode != "eval")
    assert [k for k in enc.state_dict() if "self_attn" in k] == [
        "layers.0.self_attn.in_proj_weight", "layers.0.self_attn.in_proj_bias", "layers.0.self_attn.out_proj.weight",
        "layers.0.self_attn.out_proj.bias"]
    x = torch.randn(3, 5, 8)
    lengths = torch.tensor([5, 2, 4])
    from itmatch.modules.transformer import encode_set

    with torch.no_grad():
        out = encode_set(enc, x, lengths)
        for i, n in enumerate(lengths.tolist()):
            torch.testing.assert_close(out[i, :n], hand_layer(enc.layers[0], x[i, :n]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- encoders

def test_encoders_against_a_hand_written_forward(tiny_bert: Path) -> None:
    model = hrem_model(tiny_bert).eval()
    images, captions, lengths = tiny_batch()
    img_lengths = torch.tensor([5, 3, 5, 2, 4, 5])
    with torch.no_grad():
        img = model.encode_image(images, img_lengths).emb
        txt = model.encode_text(captions, lengths).emb
        enc = model.img_enc
        mlp, bn = enc.fc.mlp, enc.fc.mlp.bns[0]
        for i, n in enumerate(img_lengths.tolist()):
            v = images[i, :n]
            hidden = torch.relu((v @ mlp.layers[0].weight.T + mlp.layers[0].bias - bn.running_mean)
                                / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias)
            x = v @ enc.fc.fc.weight.T + enc.fc.fc.bias + hidden @ mlp.layers[1].weight.T + mlp.layers[1].bias
            torch.testing.assert_close(img[i], hand_embedding(x, enc.aggr.layers[0]), rtol=1e-5, atol=1e-5)
        t = model.txt_enc
        for i, n in enumerate(lengths.tolist()):
            h = t.bert(input_ids=captions[i : i + 1, :n]).last_hidden_state[0]  # unpadded: no mask needed
            x = h @ t.linear.weight.T + t.linear.bias
            torch.testing.assert_close(txt[i], hand_embedding(x, t.aggr.layers[0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.similarity(model.encode_image(images, img_lengths),
                                                model.encode_text(captions, lengths)), img @ txt.T)


def test_init_follows_upstream(tiny_bert: Path) -> None:
    model = hrem_model(tiny_bert, image_dim=64, embed_dim=32)
    for lin in (model.img_enc.fc.fc, *model.img_enc.fc.mlp.layers):  # FC_MLP.apply(init_weights): every Linear
        r = math.sqrt(6 / (lin.in_features + lin.out_features))
        assert lin.weight.abs().max() <= r and lin.weight.abs().max() > 0.8 * r and not lin.bias.any()
    assert model.txt_enc.linear.bias.any()  # the text projection keeps torch's default init
    graph = hrem_recipe(model).graph
    a, b = graph.mlp_t2i, graph.mlp_i2t  # deep copy: same initial weights, separate parameters
    assert torch.equal(a[0].weight, b[0].weight) and a[0].weight is not b[0].weight


# ---------------------------------------------------------------- the sampled triplet loss

def hand_log_weight(s: float, n: int = 512) -> float:
    d = max(math.sqrt(max(2 - 2 * s, 0.0)), 0.5)
    return (2 - n) * math.log(d) - (n - 3) / 2 * math.log(1 - d * d / 4)


def test_distance_weights_against_the_formula() -> None:
    gen = torch.Generator().manual_seed(1)
    sims = torch.rand(5, 5, generator=gen, dtype=torch.float64) * 1.8 - 0.9
    sims[0, 3] = 0.95  # distance clamped to 0.5
    ids = torch.tensor([0, 0, 1, 2, 3])
    neg = ids[:, None] != ids[None, :]
    got = distance_weights(sims, neg, cutoff=1.7)
    for a in range(5):
        logs = [hand_log_weight(float(sims[a, b])) if neg[a, b] else 0.0 for b in range(5)]
        top = max(logs)  # non-negatives take part in the max with log-weight 0, as upstream
        w = [math.exp(lw - top) if neg[a, b] and math.sqrt(2 - 2 * float(sims[a, b])) < 1.7 else 0.0
             for b, lw in enumerate(logs)]
        want = torch.tensor(w, dtype=torch.float64) / (sum(w) + 1e-20)
        torch.testing.assert_close(got[a], want, rtol=1e-9, atol=1e-12)


def test_triplet_loss_with_one_valid_negative_per_anchor() -> None:
    # Pairs 0 and 1 share an image; every anchor has exactly one negative closer than the cutoff (sim > -0.445).
    # (Far negatives still enter the row maximum of the log-weights: much farther ones, -0.9, would underflow the
    # near ones to 0 and the loss with them, as upstream.)
    ids = torch.tensor([0, 0, 1, 2])
    far = -0.5
    sims = torch.full((4, 4), far)
    sims[0, 0], sims[0, 1], sims[1, 0], sims[1, 1] = 0.5, 0.3, 0.4, 0.6
    sims[2, 2], sims[3, 3] = 0.7, 0.2
    sims[0, 2], sims[1, 3], sims[2, 0], sims[3, 1] = 0.45, 0.1, 0.65, 0.3  # row negatives
    sims[2, 1], sims[3, 0] = far, far
    sims.requires_grad_(True)
    loss = distance_weighted_triplet_loss(sims, ids)
    s, m = sims.detach(), 0.2
    want = 0.0
    for mat in (s, s.T):  # images as anchors, then captions
        for a in range(4):
            negs = [b for b in range(4) if ids[b] != ids[a] and mat[a, b] > -0.445]
            assert len(negs) == 1
            for p in (b for b in range(4) if ids[b] == ids[a]):
                want += max(0.0, m + float(mat[a, negs[0]]) - float(mat[a, p]))
    assert float(loss.detach()) == pytest.approx(want, abs=1e-6)
    loss.backward()
    assert sims.grad is not None and sims.grad.abs().sum() > 0


def test_triplet_loss_in_expectation_over_the_sampled_negatives() -> None:
    # Similarities near 0 (distances near sqrt 2, where 1/q(d) is flat): every negative has a sizeable chance.
    gen = torch.Generator().manual_seed(0)
    sims = 0.04 * torch.randn(6, 6, generator=gen, dtype=torch.float64)
    sims.diagonal().add_(0.1)
    ids = torch.tensor([0, 1, 1, 2, 3, 4])
    expected = 0.0
    for mat in (sims, sims.T):
        neg = ids[:, None] != ids[None, :]
        w = distance_weights(mat, neg, cutoff=1.7)
        for a in range(6):
            prob = w[a] / w[a].sum()  # torch.multinomial normalises each row (upstream's +1e-20 leaves tiny sums)
            for p in (b for b in range(6) if ids[b] == ids[a]):
                expected += sum(float(prob[n]) * max(0.0, 0.2 + float(mat[a, n] - mat[a, p])) for n in range(6))
    draws = torch.stack([distance_weighted_triplet_loss(sims, ids, generator=gen) for _ in range(4000)])
    assert float(draws.mean()) == pytest.approx(expected, rel=0.02)
    assert float(draws.std()) > 0  # really sampled


def test_a_direction_without_valid_negatives_counts_zero_but_still_backpropagates() -> None:
    sims = torch.full((3, 3), -0.95)  # every negative beyond the cutoff
    sims.fill_diagonal_(0.9)
    sims.requires_grad_(True)
    loss = distance_weighted_triplet_loss(sims, torch.arange(3))
    assert float(loss.detach()) == 0.0
    loss.backward()  # upstream returns a leaf that requires grad; the step goes on


# ---------------------------------------------------------------- the relation graph

def hand_fragment_match(regions, words, lengths, topk):
    """Upstream `AdjacencyLearning.forward` (SCAN mode, img_len_use off), one caption at a time."""
    regions = F.normalize(regions, dim=-1)
    t2i_mean, t2i_top, i2t_mean, i2t_top = [], [], [], []
    for t in range(len(words)):
        n = int(lengths[t])
        w = F.normalize(words[t, : max(n, topk)], dim=-1)
        a = F.leaky_relu(torch.stack([w @ r.T for r in regions]), 0.1)  # (I, W, R)
        row = F.normalize(a, dim=1).max(dim=2).values
        t2i_mean.append(row[:, :n].mean(1))
        t2i_top.append(row.topk(topk, dim=1).values)
        col = F.normalize(a, dim=2)[:, :n].max(dim=1).values
        i2t_mean.append(col.mean(1))
        i2t_top.append(col.topk(topk, dim=1).values)
    return (torch.stack(t2i_mean), torch.stack(t2i_top), torch.stack(i2t_mean).T,
            torch.stack(i2t_top).transpose(0, 1))


def test_fragment_matching_against_the_per_caption_loop() -> None:
    gen = torch.Generator().manual_seed(2)
    regions, words = torch.randn(5, 7, 6, generator=gen), torch.randn(5, 9, 6, generator=gen)
    lengths = torch.tensor([9, 7, 4, 2, 5])  # two captions shorter than topk: padded rows join, as upstream
    got = fragment_match(regions, words, lengths, 5, chunk=2)
    for g, w in zip(got, hand_fragment_match(regions, words, lengths, 5), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    with pytest.raises(DataError, match="top 8 region matches but images have 7 regions"):
        fragment_match(regions, words, lengths, 8)


def test_connection_keeps_the_top_half_of_each_row_ties_included() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.2, 0.2, 0.1], [0.0, 1.0, -1.0, 2.0]])
    want = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(top_fraction(scores, 0.5), want)


def test_graph_relations_mask_transformer_and_kl_against_hand_computation(tiny_bert: Path) -> None:
    model = hrem_model(tiny_bert, warmup_iterations=0, mask_weight=1.5).eval()
    g = hrem_recipe(model).graph
    gen = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(4, 16, generator=gen), dim=1)
    cap = F.normalize(img + 0.7 * torch.randn(4, 16, generator=gen), dim=1)
    regions, words = torch.randn(4, 5, 16, generator=gen), torch.randn(4, 6, 16, generator=gen)
    lengths = torch.tensor([6, 5, 4, 3])
    with torch.no_grad():
        connect, relevance, reg = g.relations(img, cap, regions, words, lengths)
        img_g, cap_g, reg2 = g(img, cap, regions, words, lengths)
    t2i_mean, t2i_top, i2t_mean, i2t_top = hand_fragment_match(regions, words, lengths, 3)

    def mlp(net, x):
        return (torch.relu(x @ net[0].weight.T + net[0].bias) @ net[3].weight.T + net[3].bias)[..., 0]

    def top2(m):  # int(4 * 0.5) = 2 per row
        return m >= m.sort(dim=1, descending=True).values[:, 1:2]

    dist = lambda a, b: ((a[:, None] - b[None]) ** 2).sum(-1).sqrt()  # noqa: E731
    r_ti, r_it = mlp(g.mlp_t2i, t2i_top) + t2i_mean, mlp(g.mlp_i2t, i2t_top) + i2t_mean
    want_rel = torch.cat([torch.cat([torch.exp(-dist(img, img)), r_it], 1),
                          torch.cat([r_ti, torch.exp(-dist(cap, cap))], 1)])
    want_con = torch.cat([torch.cat([top2(img @ img.T), top2(i2t_mean)], 1),
                          torch.cat([top2(t2i_mean), top2(cap @ cap.T)], 1)])
    assert torch.equal(connect, want_con)
    torch.testing.assert_close(relevance, want_rel, rtol=1e-5, atol=1e-5)
    p = torch.exp(-dist(img, cap))

    def kl(rel, target):  # KL(softmax(rel) || softmax(target)), summed over columns, averaged over rows
        q, lp = torch.softmax(rel, 1), torch.log_softmax(target, 1)
        return (q * (q.log() - lp)).sum() / len(rel)

    torch.testing.assert_close(reg, kl(r_it, p) + kl(r_ti, p.T), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reg2, reg)
    bias = (1.5 * want_rel).masked_fill(~want_con, float("-inf"))
    nodes = hand_layer(g.gnn.layers[0], torch.cat([img, cap]), bias)
    torch.testing.assert_close(img_g, F.normalize(nodes[:4], dim=1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cap_g, F.normalize(nodes[4:], dim=1), rtol=1e-5, atol=1e-5)


def test_training_loss_is_base_plus_graph_terms_plus_weighted_kl(tiny_bert: Path) -> None:
    model = hrem_model(tiny_bert, warmup_iterations=2).eval()  # eval: no dropout, BN running statistics
    recipe = hrem_recipe(model)
    images, captions, lengths = tiny_batch()
    ids = torch.tensor([0, 0, 1, 2, 3, 3])
    with torch.no_grad():
        img, cap = model.encode_image(images).emb, model.encode_text(captions, lengths).emb
        regions, words = model.img_enc(images, torch.full((6,), 5))[2], model.txt_enc(captions, lengths)[2]
        img_g, cap_g, reg = recipe.graph(img, cap, regions, words, lengths)

    def losses(seed: int, graph: bool) -> dict:
        torch.manual_seed(seed)  # the loss draws from its own per-step stream: the global one is neither read ...
        outside = torch.get_rng_state()
        draws = recipe.draw_seed()
        terms = recipe.loss(images, captions, lengths, epoch=0, image_ids=ids)
        assert torch.equal(torch.get_rng_state(), outside)  # ... nor advanced
        torch.manual_seed(draws)  # the same draws, in upstream order: base, (img, cap_g), (img_g, cap), (img_g, cap_g)
        want = {"base": distance_weighted_triplet_loss(img @ cap.T, ids)}
        if graph:
            want["graph"] = (distance_weighted_triplet_loss(img @ cap_g.T, ids)
                             + distance_weighted_triplet_loss(img_g @ cap.T, ids)
                             + distance_weighted_triplet_loss(img_g @ cap_g.T, ids))
            want["reg"] = reg
        want["loss"] = want["base"] + (want["graph"] + 10 * reg if graph else 0)
        assert set(terms) == set(want)
        for k, v in want.items():
            torch.testing.assert_close(terms[k].detach(), v, rtol=1e-5, atol=1e-5, msg=k)
        return terms

    losses(0, graph=False)
    losses(1, graph=False)
    assert recipe.iterations == 2
    terms = losses(2, graph=True)  # the third step is the first with the graph (upstream counts after forward)
    assert float(terms["graph"].detach()) > 0 and float(terms["reg"].detach()) > 0


# ---------------------------------------------------------------- inference holds no graph

UPSTREAM_IMAGE = {"fc.fc.weight", "fc.fc.bias", *(f"fc.mlp.layers.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")),
                  *(f"fc.mlp.bns.{i}.{p}" for i in (0, 1)
                    for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"))}
AGGR = {f"aggr.layers.0.{k}" for k in (
    "self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias",
    "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias", "norm1.weight", "norm1.bias", "norm2.weight",
    "norm2.bias")}


def test_checkpoint_holds_the_encoders_only_and_inference_never_touches_the_graph(tiny_bert: Path) -> None:
    model = hrem_model(tiny_bert, warmup_iterations=0)
    state = model.state_dict()
    assert not [k for k in state if "graph" in k]
    assert {k.removeprefix("img_enc.") for k in state if k.startswith("img_enc.")} == UPSTREAM_IMAGE | AGGR
    text = {k.removeprefix("txt_enc.") for k in state if k.startswith("txt_enc.")}
    assert {k for k in text if not k.startswith("bert.")} == {"linear.weight", "linear.bias"} | AGGR
    graph = hrem_recipe(model).graph
    assert sum(p.numel() for p in graph.parameters()) > 0  # it exists for training ...
    images, captions, lengths = tiny_batch()
    sims = model.similarity(model.encode_image(images), model.encode_text(captions, lengths))
    sims.sum().backward()
    assert all(p.grad is None for p in graph.parameters())  # ... and embedding/scoring never use it
    reloaded = hrem_model(tiny_bert, warmup_iterations=0)
    reloaded.load_state_dict(state, strict=True)  # the graph's absence is not a missing key


def test_evaluation_cost_equals_vse_infinity(tiny_bert: Path) -> None:
    """Scoring is the same dot product as VSE-infinity; each embedding depends on its own sample only (no batch
    graph), so encoding costs grow linearly with the number of items and do not change once the graph is on."""
    model = hrem_model(tiny_bert, warmup_iterations=0).eval()
    torch.manual_seed(0)
    vse = create_model(VseInfinityConfig(image_dim=IMAGE_DIM, embed_dim=16, text_encoder="bert",
                                         bert_path=str(tiny_bert))).eval()
    images, captions, lengths = tiny_batch()

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
        return counter.get_total_flops()

    def score(m) -> int:
        a, b = m.encode_image(images), m.encode_text(captions, lengths)
        return flops(lambda: m.similarity(a, b))

    assert score(model) == score(vse) > 0
    one = flops(lambda: model.encode_image(images[:1]))
    assert flops(lambda: model.encode_image(images)) == 6 * one
    with torch.no_grad():
        batch = model.encode_image(images).emb
        alone = torch.cat([model.encode_image(images[i : i + 1]).emb for i in range(6)])
        txt = model.encode_text(captions, lengths).emb
        txt_alone = torch.cat([model.encode_text(captions[i : i + 1, :n], lengths[i : i + 1]).emb
                               for i, n in enumerate(lengths.tolist())])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(txt, txt_alone, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- optimiser, config, presets, training

def test_optimiser_groups_follow_upstream(tiny_bert: Path) -> None:
    model = hrem_model(tiny_bert, graph_lr_factor=0.5)
    recipe = hrem_recipe(model)
    opt = recipe.optimizer(5e-4)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 5e-5, 5e-4, 2.5e-4])
    assert all(g["weight_decay"] == 1e-4 for g in opt.param_groups)
    ids = [{id(p) for p in g["params"]} for g in opt.param_groups]
    assert ids[3] == {id(p) for p in recipe.graph.parameters()}
    assert ids[0] == {id(p) for n, p in model.txt_enc.named_parameters() if not n.startswith("bert.")}
    assert ids[1] == {id(p) for p in model.txt_enc.bert.parameters() if p.requires_grad}


def test_lr_milestones_decay_at_each_listed_epoch(tiny_bert: Path) -> None:
    opt = hrem_recipe(hrem_model(tiny_bert)).optimizer(1.0)
    base = [g["lr"] for g in opt.param_groups]
    for epoch, factor in [(0, 1.0), (14, 1.0), (15, 0.1), (24, 0.1), (25, 0.01), (29, 0.01)]:
        _set_lr(opt, base, epoch, 0, (15, 25))
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([b * factor for b in base])


@pytest.mark.parametrize("kw,match", [({"embed_dim": 20, "nhead": 16}, "multiple of model.nhead"),
                                      ({"threshold": 0.0}, "threshold"), ({"image_dim": 0}, "image_dim")])
def test_bad_configs_are_one_line(tiny_bert: Path, kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        hrem_model(tiny_bert, **kw)


@pytest.mark.parametrize("name,batch,mask_weight,cutoff,test", [("hrem_f30k_bert", 128, 1.0, 1.7, "test"),
                                                              ("hrem_coco_bert", 256, 1.5, 1.9, "testall")])
def test_presets_follow_the_original_arguments(name: str, batch: int, mask_weight: float, cutoff: float,
                                               test: str) -> None:
    cfg = load_preset(name)
    m, t, d = cfg.model, cfg.train, cfg.data
    assert (m.embed_dim, m.nhead, m.dropout, m.residual_weight, m.warmup_iterations) == (1024, 16, 0.1, 0.8, 8000)
    assert (m.threshold, m.relation_topk, m.reg_loss_weight, m.mask_weight, m.triplet_cutoff) == (
        0.5, 10, 10.0, mask_weight, cutoff)
    assert m.norm_input and m.cross_loss and m.graph_layers == 1 and m.graph_lr_factor == 1.0
    assert (t.epochs, t.lr, t.lr_milestones, t.grad_clip, t.region_drop, t.word_noise) == (
        30, 5e-4, (15, 25), 2.0, 0.2, 0.2)
    assert d.batch_size == batch and d.test_split == test
    assert d.val_split == "dev"  # selection on dev by default; the original's test selection is opt-in


def test_vse0_warmup_replaces_only_the_base_term_in_its_epochs(tiny_bert: Path) -> None:
    """Not upstream (synthetic preset only): the base term is VSE0, sum over all negatives, before the switch."""
    from itmatch.losses import hinge_loss

    model = hrem_model(tiny_bert, warmup_iterations=100, vse_mean_warmup_epochs=1).eval()
    recipe = hrem_recipe(model)
    images, captions, lengths = tiny_batch()
    ids = torch.tensor([0, 0, 1, 2, 3, 3])
    with torch.no_grad():
        sims = model.encode_image(images).emb @ model.encode_text(captions, lengths).emb.T
    eye = torch.eye(6, dtype=torch.bool)
    vse0 = ((0.2 + sims - sims.diagonal()[:, None]).clamp(min=0).masked_fill(eye, 0).sum()
            + (0.2 + sims - sims.diagonal()[None, :]).clamp(min=0).masked_fill(eye, 0).sum())
    terms = recipe.loss(images, captions, lengths, epoch=0, image_ids=ids)
    torch.testing.assert_close(terms["base"].detach(), vse0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vse0, hinge_loss(sims, margin=0.2, max_violation=False), rtol=1e-5, atol=1e-5)
    torch.manual_seed(3)
    terms = recipe.loss(images, captions, lengths, epoch=1, image_ids=ids)
    torch.manual_seed(3)
    torch.testing.assert_close(terms["base"].detach(), distance_weighted_triplet_loss(sims, ids), rtol=1e-5,
                               atol=1e-5)
    assert load_preset("hrem_f30k_bert").model.vse_mean_warmup_epochs == 0  # the original's loss throughout


def test_synthetic_preset_mirrors_the_vse_infinity_one() -> None:
    hrem, vse = load_preset("hrem_synth_minilm"), load_preset("vse_infinity_synth_minilm")
    assert hrem.data == vse.data
    assert dataclasses.replace(hrem.train, max_violation=vse.train.max_violation) == vse.train
    assert (hrem.model.embed_dim, hrem.model.bert_path) == (vse.model.embed_dim, vse.model.bert_path)


def small(data: Path, bert: Path, *extra: str):
    sets = ["model.embed_dim=16", "model.nhead=2", "model.relation_topk=3", "model.warmup_iterations=3",
            "data.batch_size=16", "data.train_images=16", "train.epochs=2", "train.lr=1e-3",
            f"data.path={json.dumps(str(data))}", f"model.bert_path={json.dumps(str(bert))}", *extra]
    return load_preset("hrem_synth_minilm", sets)


def test_resume_restores_the_graph_and_its_warmup_counter_exactly(tiny_data: Path, tiny_bert: Path,
                                                                  tmp_path: Path) -> None:
    # 5 steps per epoch; the graph switches on at step 4, the crash at step 7 follows the checkpoint of step 6
    crashed, a, b = crash_and_resume(small(tiny_data, tiny_bert, "train.save_every=3"), tmp_path, crash_at=7)
    assert crashed["training_state"]["iterations"] == 6
    assert a["training_state"]["iterations"] == b["training_state"]["iterations"] == 10
    for k, v in a["training_state"]["graph"].items():
        assert torch.equal(v, b["training_state"]["graph"][k]), k
    assert not [k for k in a["model"] if "graph" in k]
    best = native.load(tmp_path / "ref" / "model_best.pt")
    assert "training_state" not in best and not [k for k in best["model"] if "graph" in k]


def test_resuming_without_graph_state_is_refused(tiny_bert: Path) -> None:
    with pytest.raises(CheckpointError, match="no relation-graph state"):
        hrem_recipe(hrem_model(tiny_bert)).load_state_dict({})


def test_training_passes_the_image_ids_to_the_loss(tiny_data: Path, tiny_bert: Path, tmp_path: Path,
                                                   monkeypatch) -> None:
    from itmatch.models.hrem import HremRecipe

    seen = []
    original = HremRecipe.loss

    def spy(self, images, captions, lengths, *, epoch, image_lengths=None, image_ids=None):
        seen.append(image_ids)
        return original(self, images, captions, lengths, epoch=epoch, image_lengths=image_lengths,
                        image_ids=image_ids)

    monkeypatch.setattr(HremRecipe, "loss", spy)
    fit(small(tiny_data, tiny_bert, "train.max_steps=1"), tmp_path / "run")
    assert len(seen) == 1 and seen[0] is not None and len(seen[0]) == 16
    assert (tmp_path / "run" / CHECKPOINT).is_file()


def test_selecting_on_the_test_split_is_explicit_and_warned(tiny_data: Path, tiny_bert: Path, tmp_path: Path,
                                                            caplog) -> None:
    assert small(tiny_data, tiny_bert).data.val_split == "dev"
    with caplog.at_level("WARNING", logger="itmatch.training"):
        fit(small(tiny_data, tiny_bert, "train.max_steps=1", 'data.val_split="test"'), tmp_path / "run")
    assert "model selection on the test split" in caplog.text


def test_without_norm_input_only_the_graph_transformer_sees_the_raw_embeddings(tiny_bert: Path) -> None:
    model = hrem_model(tiny_bert, warmup_iterations=0, norm_input=False).eval()
    recipe = hrem_recipe(model)
    images, captions, lengths = tiny_batch()
    with torch.no_grad():
        img, img_raw, regions = model.img_enc(images, torch.full((6,), 5))
        cap, cap_raw, words = model.txt_enc(captions, lengths)
        _, relevance, reg = recipe.graph.relations(img, cap, regions, words, lengths)  # normalised, as upstream
        img_g, cap_g, reg2 = recipe.graph(img, cap, regions, words, lengths, (img_raw, cap_raw))
        same_g, _, _ = recipe.graph(img, cap, regions, words, lengths)
    torch.testing.assert_close(reg2, reg)
    assert not torch.allclose(img_g, same_g)
    torch.manual_seed(0)
    terms = recipe.loss(images, captions, lengths, epoch=0)
    torch.manual_seed(0)
    want = distance_weighted_triplet_loss(img @ cap.T, torch.arange(6))
    torch.testing.assert_close(terms["base"].detach(), want)
    torch.testing.assert_close(terms["reg"].detach(), reg)
