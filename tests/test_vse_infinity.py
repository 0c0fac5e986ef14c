"""VSE-infinity: encoders (BiGRU, tiny BERT), tokenizer, augmentations, optimiser, warm-up, schedule, resume."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from itmatch.checkpoints import native
from itmatch.checkpoints.loader import load_model
from itmatch.config import load_preset
from itmatch.data.augment import AugmentedCaptions, kept_regions, noisy_words
from itmatch.data.precomp import CaptionDataset, PrecompSplit
from itmatch.data.tokenize import text_tokenizer
from itmatch.data.vocab import load_vocab
from itmatch.data.wordpiece import WordpieceTokenizer
from itmatch.errors import ConfigError
from itmatch.losses import hinge_loss
from itmatch.models.vse_infinity import VseInfinityConfig
from itmatch.modules.norm import l2norm
from itmatch.registry import create_model
from itmatch.training import CHECKPOINT, _set_lr, fit
from tests.conftest import crash_and_resume, training_recipe
from tests.test_models import IMAGE_DIM, tiny_batch


def bert_model(bert_dir: Path, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = VseInfinityConfig(image_dim=IMAGE_DIM, embed_dim=16, text_encoder="bert", bert_path=str(bert_dir), **kw)
    return create_model(cfg)


def bigru_model(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(VseInfinityConfig(image_dim=IMAGE_DIM, embed_dim=16, vocab_size=30, word_dim=8, **kw))


def test_bert_encoder_shapes_projection_and_gradients(tiny_bert: Path) -> None:
    model = bert_model(tiny_bert)
    assert model.txt_enc.linear.in_features == 24  # hidden_size of the tiny BERT config, not 768
    images, captions, lengths = tiny_batch()
    sims = model.similarity(model.encode_image(images), model.encode_text(captions, lengths))
    assert sims.shape == (6, 6)
    hinge_loss(sims).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == ["img_enc.mlp.bns.1.bias", "img_enc.mlp.bns.1.weight", "txt_enc.bert.pooler.dense.bias",
                      "txt_enc.bert.pooler.dense.weight"]  # the parts upstream never uses


def test_bert_text_embeddings_ignore_padding(tiny_bert: Path) -> None:
    model = bert_model(tiny_bert).eval()
    _, captions, lengths = tiny_batch()
    padded = torch.cat([captions, torch.zeros(len(captions), 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        a = model.encode_text(captions, lengths).emb
        b = model.encode_text(padded, lengths).emb
        alone = torch.cat([model.encode_text(captions[i : i + 1, :n], lengths[i : i + 1]).emb
                           for i, n in enumerate(lengths.tolist())])
    assert a.shape == (6, 16)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(6))


def test_bert_text_is_linear_then_gpo_then_l2norm(tiny_bert: Path) -> None:
    model = bert_model(tiny_bert).eval()
    _, captions, lengths = tiny_batch()
    with torch.no_grad():
        enc = model.txt_enc
        for i, n in enumerate(lengths.tolist()):
            h = enc.bert(input_ids=captions[i : i + 1, :n]).last_hidden_state  # no padding: no mask needed
            pooled, _ = enc.gpool(enc.linear(h), lengths[i : i + 1])
            torch.testing.assert_close(model.encode_text(captions, lengths).emb[i], l2norm(pooled, eps=1e-8)[0],
                                       rtol=1e-5, atol=1e-6)


def test_region_encoder_is_fc_plus_mlp_then_gpo() -> None:
    model = bigru_model().eval()
    images, _, _ = tiny_batch()
    lengths = torch.tensor([5, 2, 3, 5, 1, 4])
    with torch.no_grad():
        got = model.encode_image(images, lengths).emb
        enc = model.img_enc
        for i, n in enumerate(lengths.tolist()):
            v = images[i, :n]
            bn = enc.mlp.bns[0]  # eval: running statistics
            hidden = torch.relu((v @ enc.mlp.layers[0].weight.T + enc.mlp.layers[0].bias - bn.running_mean)
                                / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias)
            x = v @ enc.fc.weight.T + enc.fc.bias + hidden @ enc.mlp.layers[1].weight.T + enc.mlp.layers[1].bias
            pooled, _ = enc.gpool(x[None], lengths[i : i + 1])
            torch.testing.assert_close(got[i], l2norm(pooled, eps=1e-8)[0], rtol=1e-5, atol=1e-6)
        full = model.encode_image(images).emb  # default: every region valid
        torch.testing.assert_close(full, model.encode_image(images, torch.full((6,), 5)).emb)


def test_wordpiece_tokenizer_frames_words_with_cls_sep(tiny_bert: Path) -> None:
    tok = WordpieceTokenizer(str(tiny_bert))
    vocab = (tiny_bert / "vocab.txt").read_text().splitlines()
    ids = {w: i for i, w in enumerate(vocab)}
    prefix, words, suffix = tok.words("The red cubes, man.")
    assert prefix == [ids["[CLS]"]] and suffix == [ids["[SEP]"]]
    # lower-cased, punctuation split off, greedy longest-match pieces: "cubes" -> "cube" + "##s" (not "cub" ...)
    assert words == [[ids["the"]], [ids["red"]], [ids["cube"], ids["##s"]], [ids[","]], [ids["man"]], [ids["."]]]
    assert tok.encode("The red cubes, man.")[0] == ids["[CLS]"] and len(tok) == len(vocab)
    assert tok.encode("zzz") == [ids["[CLS]"], ids["[UNK]"], ids["[SEP]"]]


class ScriptedRng:
    """Stands in for a numpy Generator: returns the given uniforms in order, and 7 for every random id."""

    def __init__(self, uniforms: list[float]) -> None:
        self.uniforms = list(uniforms)

    def random(self) -> float:
        return self.uniforms.pop(0)

    def integers(self, high: int, size: int) -> np.ndarray:
        return np.full(size, 7)


def test_word_noise_thresholds_follow_upstream() -> None:
    words = [[10], [11, 12], [13], [14, 15], [16]]
    # u = 0.05 -> v = 0.25: mask; 0.11 -> 0.55: random; 0.15 -> 0.75: delete; 0.2 and 0.9: keep
    out = noisy_words(words, 0.2, mask_id=3, vocab_size=50, rng=ScriptedRng([0.05, 0.11, 0.15, 0.2, 0.9]))
    assert out == [3, 7, 7, 14, 15, 16]


def test_word_noise_and_region_drop_rates() -> None:
    rng = np.random.default_rng(0)
    words = [[i] for i in range(100, 120)]
    outs = [noisy_words(words, 0.2, mask_id=1, vocab_size=50, rng=rng) for _ in range(2000)]
    n = 20 * 2000
    masked = sum(o.count(1) for o in outs) / n
    kept = sum(len(o) for o in outs) / n
    assert masked == pytest.approx(0.10, abs=0.01) and kept == pytest.approx(0.92, abs=0.01)  # 8 % deleted
    kept_regions_share = np.mean([len(kept_regions(36, 0.2, rng)) for _ in range(2000)]) / 36
    assert kept_regions_share == pytest.approx(0.8, abs=0.01)
    order = kept_regions(36, 0.2, rng)
    assert np.all(np.diff(order) > 0)  # original order kept


def test_augmented_batches_mask_padding_and_repeat_with_the_seed(tiny_data: Path) -> None:
    split = PrecompSplit(tiny_data, "train")
    vocab = text_tokenizer(VseInfinityConfig(), load_vocab(tiny_data / "vocab.json"))
    assert vocab("<mask>") == len(vocab) - 1  # appended as upstream
    aug = AugmentedCaptions(CaptionDataset(split, vocab), vocab, region_drop=0.2, word_noise=0.2)
    a = aug.batch(list(range(16)), np.random.default_rng([0, 1, 2]))
    b = aug.batch(list(range(16)), np.random.default_rng([0, 1, 2]))
    assert torch.equal(a.images, b.images) and torch.equal(a.captions, b.captions)
    assert a.image_lengths is not None and a.images.shape[1] == int(a.image_lengths.max())
    for i, n in enumerate(a.image_lengths.tolist()):
        assert a.images[i, n:].abs().sum() == 0 and (a.images[i, :n].abs().sum(1) > 0).all()
    assert (a.lengths[:-1] >= a.lengths[1:]).all()  # sorted as collate
    c = aug.batch(list(range(16)), np.random.default_rng([0, 1, 3]))
    assert not torch.equal(a.image_lengths, c.image_lengths) or not torch.equal(a.captions, c.captions)


def test_word_noise_needs_a_mask_token(tiny_data: Path) -> None:
    split = PrecompSplit(tiny_data, "train")
    vocab = load_vocab(tiny_data / "vocab.json")
    with pytest.raises(ConfigError, match="<mask>"):
        AugmentedCaptions(CaptionDataset(split, vocab), vocab, word_noise=0.2)


def test_optimiser_groups_and_weight_decay_per_branch(tiny_bert: Path) -> None:
    model = bert_model(tiny_bert)
    opt = training_recipe(model).optimizer(5e-4)
    assert isinstance(opt, torch.optim.AdamW)
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs == pytest.approx([5e-4, 5e-5, 5e-4]) and all(g["weight_decay"] == 1e-4 for g in opt.param_groups)
    bert = {id(p) for p in model.txt_enc.bert.parameters() if p.requires_grad}
    assert {id(p) for p in opt.param_groups[1]["params"]} == bert
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for n, p in model.txt_enc.named_parameters()
                                                              if not n.startswith("bert.")}
    # upstream's schedule multiplies each group's current lr by 0.1 at epoch lr_update; the loop rescales bases
    base = [g["lr"] for g in opt.param_groups]
    for epoch in range(25):
        _set_lr(opt, base, epoch, 15)
        want = [b * (0.1 if epoch >= 15 else 1.0) for b in base]
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(want)
    opt = training_recipe(bigru_model()).optimizer(5e-4)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.01


def test_hardest_negatives_after_the_warmup() -> None:
    recipe = training_recipe(bigru_model(vse_mean_warmup_epochs=1), max_violation=False)
    recipe.on_epoch_start(0)
    assert not recipe.max_violation
    recipe.on_epoch_start(1)
    assert recipe.max_violation


@pytest.mark.parametrize("name", ["vse_infinity_f30k_bigru", "vse_infinity_coco_bigru", "vse_infinity_f30k_bert",
                                  "vse_infinity_coco_bert", "vse_infinity_synth_bigru", "vse_infinity_synth_minilm"])
def test_presets_follow_the_original_scripts(name: str) -> None:
    cfg = load_preset(name)
    t = cfg.train
    # a single x0.1 step, which `0.1 ** (epoch // lr_update)` gives only while epochs < 2 * lr_update
    assert t.lr_update < t.epochs < 2 * t.lr_update
    assert (t.margin, t.grad_clip, t.max_violation, t.region_drop, t.word_noise) == (0.2, 2.0, False, 0.2, 0.2)
    assert cfg.model.vse_mean_warmup_epochs == 1 and cfg.data.batch_size == 128
    if "synth" not in name:
        assert (t.epochs, t.lr, t.lr_update, cfg.model.embed_dim) == (25, 5e-4, 15, 1024)


def small(data: Path, *extra: str):
    sets = ["model.embed_dim=16", "model.word_dim=8", "data.batch_size=16", "data.train_images=16", "train.epochs=3",
            "train.lr_update=2", "train.lr=1e-3", f"data.path={json.dumps(str(data))}", *extra]
    return load_preset("vse_infinity_synth_bigru", sets)


def test_resume_with_augmentation_is_bit_identical(tiny_data: Path, tmp_path: Path) -> None:
    # 5 steps per epoch: step 8 is mid-epoch 2, after the checkpoint of step 6
    crashed, a, _ = crash_and_resume(small(tiny_data, "train.save_every=3"), tmp_path, crash_at=8)
    assert crashed["state"]["step_in_epoch"] == 1
    assert a["vocab"][-1] == "<mask>" and a["config"]["model"]["vocab_size"] == len(a["vocab"])


def test_augmentation_reaches_training(tiny_data: Path, tmp_path: Path) -> None:
    def one_step(out: str, *sets: str) -> dict:
        fit(small(tiny_data, "train.max_steps=1", *sets), tmp_path / out)
        return native.load(tmp_path / out / CHECKPOINT)["model"]

    plain = one_step("plain", "train.region_drop=0.0", "train.word_noise=0.0")
    again = one_step("again", "train.region_drop=0.0", "train.word_noise=0.0")
    noisy = one_step("noisy")
    key = "img_enc.fc.weight"
    assert torch.equal(plain[key], again[key]) and not torch.equal(plain[key], noisy[key])


def test_region_drop_needs_a_model_with_image_lengths(tiny_data: Path, tmp_path: Path) -> None:
    cfg = load_preset("vsepp_synth", [f"data.path={json.dumps(str(tiny_data))}", "train.region_drop=0.2",
                                      "model.embed_dim=16", "model.word_dim=8"])
    with pytest.raises(ConfigError, match="region_drop"):
        fit(cfg, tmp_path / "run")


def test_bert_training_runs_on_the_tiny_bert(tiny_data: Path, tiny_bert: Path, tmp_path: Path) -> None:
    cfg = load_preset("vse_infinity_synth_minilm", [
        f"data.path={json.dumps(str(tiny_data))}", f"model.bert_path={json.dumps(str(tiny_bert))}",
        "model.embed_dim=16", "data.batch_size=16", "train.epochs=1", "train.max_steps=3", "data.train_images=0"])
    summary = fit(cfg, tmp_path / "run")
    assert summary["steps"] == 3
    saved = native.load(tmp_path / "run" / CHECKPOINT)
    assert saved["vocab"] == [] and saved["config"]["model"]["vocab_size"] == len(WordpieceTokenizer(str(tiny_bert)))
    assert dataclasses.asdict(cfg.model)["text_encoder"] == "bert"
    loaded = load_model(tmp_path / "run" / CHECKPOINT)  # native BERT checkpoint: tokenizer from model.bert_path
    assert isinstance(loaded.vocab, WordpieceTokenizer)
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(tmp_path / "run" / CHECKPOINT, bert_path=str(tmp_path))  # relocated to a wrong directory
