"""VSRN: graph reasoning against its formulas, the caption branch against hand counts, training."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from itmatch.config import load_preset
from itmatch.losses import caption_nll
from itmatch.models.vsrn import VsrnConfig, caption_targets
from itmatch.modules.captioner import RegionCaptioner
from itmatch.modules.graph import ResidualGraphConv
from itmatch.registry import create_model
from tests.conftest import crash_and_resume, training_recipe

IMAGE_DIM, DIM, REGIONS = 8, 12, 6  # tiny_data has 6 regions of 8-d features


def randomise_batch_norms(module: nn.Module, seed: int) -> None:
    """Give every batch norm non-trivial affine parameters and running statistics (they start as 0/1)."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.weight.data = torch.rand(m.num_features, generator=gen) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=gen)
            m.running_mean = torch.randn(m.num_features, generator=gen) * 0.1
            m.running_var = torch.rand(m.num_features, generator=gen) + 0.5


# --------------------------------------------------------------------------------------------- graph reasoning
def test_graph_conv_is_the_identity_at_init() -> None:
    torch.manual_seed(0)
    layer = ResidualGraphConv(DIM)
    v = torch.randn(3, REGIONS, DIM)
    torch.testing.assert_close(layer(v), v)  # BN weight and bias start at 0


@pytest.mark.parametrize("train", [False, True])
def test_graph_conv_matches_the_formulas_per_sample(train: bool) -> None:
    torch.manual_seed(0)
    layer = ResidualGraphConv(DIM)
    randomise_batch_norms(layer, 1)
    layer.train(train)
    v = torch.randn(4, REGIONS, DIM, dtype=torch.float64)
    layer.double()
    with torch.no_grad():
        out = layer(v)
        wy = []
        for x in v:  # one image: x (R, D)
            th = x @ layer.theta.weight.T + layer.theta.bias
            ph = x @ layer.phi.weight.T + layer.phi.bias
            g = x @ layer.g.weight.T + layer.g.bias
            affinity = torch.empty(REGIONS, REGIONS, dtype=x.dtype)
            for i in range(REGIONS):
                for j in range(REGIONS):
                    affinity[i, j] = th[i] @ ph[j] / REGIONS  # no softmax
            wy.append((affinity @ g) @ layer.w.weight.T + layer.w.bias)
        wy = torch.stack(wy)  # (B, R, D)
        bn = layer.bn
        if train:  # statistics per channel over batch AND regions, biased variance
            mean, var = wy.mean(dim=(0, 1)), wy.var(dim=(0, 1), unbiased=False)
        else:
            mean, var = bn.running_mean, bn.running_var
        expected = (wy - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias + v
    torch.testing.assert_close(out, expected)


def sample_inputs(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    images = torch.rand(5, REGIONS, IMAGE_DIM, generator=gen)
    lengths = torch.tensor([7, 3, 5, 4, 6])
    captions = torch.randint(4, vocab_size, (5, 7), generator=gen)
    captions[torch.arange(7)[None, :] >= lengths[:, None]] = 0
    return images, captions, lengths


# --------------------------------------------------------------------------------------------- caption branch
def test_caption_targets_follow_the_original_framing() -> None:
    captions = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])
    lengths = torch.tensor([4, 3])
    labels, mask = caption_targets(captions, lengths, max_len=5)
    assert labels.tolist() == [[1, 5, 6, 2, 0, 0], [1, 7, 2, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]  # tokens + one trailing <pad>
    labels, mask = caption_targets(captions, lengths, max_len=3)  # cut to 3 tokens, the last one made <end>
    assert labels.tolist() == [[1, 5, 2, 0], [1, 7, 2, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]


def test_caption_nll_against_a_hand_count() -> None:
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
                           [[0.0, 0.0, 3.0], [1.0, 1.0, 1.0]]])
    targets = torch.tensor([[0, 1], [2, 0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])

    def nll(row: list[float], k: int) -> float:
        return -(row[k] - math.log(sum(math.exp(x) for x in row)))

    by_hand = (nll([2, 0, 0], 0) + nll([0, 1, 0], 1) + nll([0, 0, 3], 2)) / 2  # summed tokens / 2 captions
    got = caption_nll(torch.log_softmax(logits, dim=-1), targets, mask)
    assert got.item() == pytest.approx(by_hand, rel=1e-6)


def test_captioner_matches_a_literal_attention_decoder() -> None:
    torch.manual_seed(0)
    cap = RegionCaptioner(DIM, 9, hidden=7, word_dim=4, dropout=0.0)
    regions, words = torch.randn(3, REGIONS, DIM), torch.randint(0, 9, (3, 5))
    with torch.no_grad():
        got = cap(regions, words)
        enc, h = cap.encoder(cap.region_proj(regions))
        h = h[0]
        for t in range(words.shape[1]):
            cat = torch.cat([enc, h[:, None].expand(-1, REGIONS, -1)], dim=2)  # [e_r ; h] as upstream
            alpha = cap.att_score(torch.tanh(cap.att_hidden(cat))).squeeze(2).softmax(dim=1)
            context = torch.bmm(alpha[:, None], enc)[:, 0]
            h = cap.decoder(torch.cat([cap.embed(words[:, t]), context], dim=1), h)
            torch.testing.assert_close(got[:, t], torch.log_softmax(cap.out(h), dim=1), rtol=1e-5, atol=1e-6)


def tiny_vsrn(**changes) -> torch.nn.Module:
    cfg = VsrnConfig(image_dim=IMAGE_DIM, embed_dim=DIM, word_dim=5, vocab_size=20, caption_hidden=6,
                     caption_word_dim=4, caption_dropout=0.0, caption_max_len=8, **changes)
    torch.manual_seed(0)
    return create_model(cfg)


def test_caption_loss_equals_the_full_length_decoding() -> None:
    model = tiny_vsrn()
    recipe = training_recipe(model)
    images, captions, lengths = sample_inputs(20)
    terms = recipe.loss(images, captions, lengths, epoch=0)
    with torch.no_grad():
        _, regions = model.img_enc(images)
        labels, mask = caption_targets(captions, lengths, 8)
        logprobs = recipe.caption(regions, labels[:, :7])  # upstream: max_len - 1 steps, always
        by_hand = sum(-logprobs[i, t, labels[i, t + 1]] * mask[i, t + 1] for i in range(5) for t in range(7)) / 5
    torch.testing.assert_close(terms["caption"].detach(), by_hand)
    torch.testing.assert_close(terms["loss"], terms["matching"] + terms["caption"])


def test_caption_branch_is_one_option_that_changes_only_training() -> None:
    with_branch, without = tiny_vsrn(), tiny_vsrn(caption_loss_weight=0.0)
    recipe_a, recipe_b = training_recipe(with_branch), training_recipe(without)
    assert sum(p.numel() for p in recipe_a.parameters()) > sum(p.numel() for p in recipe_b.parameters())
    assert set(recipe_a.modules()) == {"caption"} and not recipe_b.modules()
    a, b = with_branch.state_dict(), without.state_dict()
    assert list(a) == list(b) and not any("caption" in k for k in a)  # checkpoints never hold the branch
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same seed draws the same encoders
    images, captions, lengths = sample_inputs(20)
    with torch.no_grad():
        sims = [m.eval().similarity(m.encode_image(images), m.encode_text(captions, lengths))
                for m in (with_branch, without)]
    assert torch.equal(sims[0], sims[1])
    with_branch.train(), without.train()
    la = recipe_a.loss(images, captions, lengths, epoch=0)
    lb = recipe_b.loss(images, captions, lengths, epoch=0)
    assert set(lb) == {"loss"} and la["caption"] > 0
    torch.testing.assert_close(la["matching"], lb["loss"])
    without.load_state_dict(with_branch.state_dict())  # strict: the branch is neither saved nor expected


def test_selection_uses_r1_and_r5_only() -> None:
    results = {"i2t": {"R@1": 10.0, "R@5": 20.0, "R@10": 30.0}, "t2i": {"R@1": 1.0, "R@5": 2.0, "R@10": 3.0},
               "rsum": 66.0}
    assert training_recipe(tiny_vsrn()).selection_score(results) == 33.0


def test_presets_mirror_the_original_commands() -> None:
    f30k, coco = load_preset("vsrn_f30k_precomp"), load_preset("vsrn_coco_precomp")
    assert (f30k.model.fc_region_norm, f30k.model.final_bn, f30k.train.lr_update) == (False, True, 10)
    assert (coco.model.fc_region_norm, coco.model.final_bn, coco.train.lr_update) == (True, False, 15)
    for cfg in (f30k, coco):
        assert (cfg.model.embed_dim, cfg.model.caption_max_len, cfg.model.caption_loss_weight) == (2048, 60, 1.0)
        assert (cfg.train.epochs, cfg.train.lr, cfg.train.margin, cfg.train.grad_clip) == (30, 2e-4, 0.2, 2.0)
        assert cfg.train.max_violation and cfg.data.batch_size == 128
        assert (cfg.train.val_every, cfg.train.val_selects) == (500, True)
        assert cfg.model.vse_mean_warmup_epochs == 0  # upstream: hardest negatives from the first step


@pytest.mark.parametrize(("warmup", "configured", "expected"), [
    (0, False, [False, False, False]),  # 0 = no switch: train.max_violation is left as configured
    (0, True, [True, True, True]),
    (2, False, [False, False, True]),  # VSE0 for two epochs, then hardest negatives
])
def test_hard_negative_warmup_switches_after_its_epochs(warmup: int, configured: bool, expected: list) -> None:
    recipe = training_recipe(tiny_vsrn(vse_mean_warmup_epochs=warmup), max_violation=configured)
    seen = []
    for epoch in range(3):
        recipe.on_epoch_start(epoch)
        seen.append(recipe.max_violation)
    assert seen == expected


# --------------------------------------------------------------------------------------------- training
SMALL = ["model.embed_dim=12", "model.caption_hidden=6", "model.word_dim=5", "data.batch_size=32",
         "train.epochs=2", "train.lr=1e-3", "train.val_every=0"]


def test_mid_epoch_validations_select_the_best_model(tiny_data: Path, tmp_path: Path, monkeypatch) -> None:
    import itmatch.training as train_mod
    from itmatch.checkpoints import native

    scores = iter([5.0, 40.0, 7.0, 9.0])  # steps 2, 4, 6 and the epoch end

    def scripted(*args, **kwargs) -> dict:
        s = next(scores)
        return {"i2t": {"R@1": s, "R@5": 0.0, "R@10": 50.0}, "t2i": {"R@1": 0.0, "R@5": 0.0, "R@10": 50.0},
                "rsum": s + 100.0}

    monkeypatch.setattr(train_mod, "evaluate_model", scripted)
    cfg = load_preset("vsrn_synth", [f"data.path={json.dumps(str(tiny_data))}", *SMALL, "train.epochs=1",
                                     "train.val_every=2", "train.val_selects=true"])  # 7 steps
    summary = train_mod.fit(cfg, tmp_path / "run")
    best = native.load(tmp_path / "run" / train_mod.BEST)
    assert summary["best_score"] == 40.0 and best["state"]["global_step"] == 4  # 2nd validation, mid-epoch
    assert not any("caption" in k for k in best["model"])


def test_resume_with_the_caption_branch_is_bit_identical(tiny_data: Path, tmp_path: Path) -> None:
    cfg = load_preset("vsrn_synth", [f"data.path={json.dumps(str(tiny_data))}", *SMALL, "train.save_every=3"])
    # 7 steps per epoch: step 10 is mid-epoch 2, after the checkpoint of step 9
    _, a, b = crash_and_resume(cfg, tmp_path, crash_at=10)
    assert not any("caption" in k for k in a["model"])
    for k, v in a["training_state"]["caption"].items():
        assert torch.equal(v, b["training_state"]["caption"][k]), k
