"""VSE++'s released checkpoints: a file in the original's layout (fartashf/vsepp `train.py`: [image state, text
state] + pickled options) with its pickled vocabulary loads and scores like a by-hand forward of the original
architecture; detection leaves the other originals' files (same outer layout) to their importers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from itmatch.checkpoints.loader import importers, load_model
from itmatch.cli import main
from itmatch.data.precomp import pad_captions
from itmatch.errors import CheckpointError
from itmatch.models import vsepp as vsepp_ckpt
from tests.conftest import write_tiny_dataset, write_vsepp_pickle

IMAGE_DIM, EMBED, WORD_DIM = 12, 10, 6
SPECIALS = ["<pad>", "<start>", "<end>", "<unk>"]


def original_states(vocab_size: int, seed: int = 0, num_layers: int = 1) -> list[dict[str, torch.Tensor]]:
    """Random weights under the original's key names (EncoderImagePrecomp.fc, EncoderText.embed / .rnn)."""
    gen = torch.Generator().manual_seed(seed)
    img = {"fc.weight": torch.randn(EMBED, IMAGE_DIM, generator=gen) * 0.3,
           "fc.bias": torch.randn(EMBED, generator=gen)}
    txt = {"embed.weight": torch.randn(vocab_size, WORD_DIM, generator=gen) * 0.5}
    for layer in range(num_layers):
        width = WORD_DIM if layer == 0 else EMBED
        txt[f"rnn.weight_ih_l{layer}"] = torch.randn(3 * EMBED, width, generator=gen) * 0.4
        txt[f"rnn.weight_hh_l{layer}"] = torch.randn(3 * EMBED, EMBED, generator=gen) * 0.4
        txt[f"rnn.bias_ih_l{layer}"] = torch.randn(3 * EMBED, generator=gen) * 0.1
        txt[f"rnn.bias_hh_l{layer}"] = torch.randn(3 * EMBED, generator=gen) * 0.1
    return [img, txt]


def original_opt(**kw) -> argparse.Namespace:
    """The options the original's train.py pickles (its argparse defaults, sizes of this test)."""
    opt = dict(data_path="/data", data_name="f30k_precomp", vocab_path="./vocab/", margin=0.2, num_epochs=30,
               batch_size=128, word_dim=WORD_DIM, embed_size=EMBED, grad_clip=2.0, crop_size=224, num_layers=1,
               learning_rate=2e-4, lr_update=15, workers=10, log_step=10, val_step=500, logger_name="runs/runX",
               resume="", max_violation=True, img_dim=IMAGE_DIM, finetune=False, cnn_type="vgg19", use_restval=False,
               measure="cosine", use_abs=False, no_imgnorm=False, reset_train=False)
    return argparse.Namespace(**(opt | kw))


def save_original(path: Path, states: list[dict], opt: argparse.Namespace | None = None) -> Path:
    torch.save({"epoch": 7, "model": states, "best_rsum": 123.4, "opt": opt or original_opt(), "Eiters": 999}, path)
    return path


def by_hand_image(states: list[dict], feats: torch.Tensor) -> torch.Tensor:
    """EncoderImagePrecomp: fc, then x / sqrt(sum x^2) (no eps); region features are mean-pooled first."""
    if feats.ndim == 3:
        feats = feats.mean(1)
    x = feats.double() @ states[0]["fc.weight"].double().T + states[0]["fc.bias"].double()
    return x / x.pow(2).sum(1, keepdim=True).sqrt()


def by_hand_text(states: list[dict], captions: list[list[int]]) -> torch.Tensor:
    """EncoderText: embedding, a one-layer GRU stepped by hand (torch's gate equations), state after the last
    word, l2norm."""
    sd = {k: v.double() for k, v in states[1].items()}
    w_ih, w_hh, b_ih, b_hh = sd["rnn.weight_ih_l0"], sd["rnn.weight_hh_l0"], sd["rnn.bias_ih_l0"], sd["rnn.bias_hh_l0"]
    out = []
    for ids in captions:
        h = torch.zeros(EMBED, dtype=torch.float64)
        for t in ids:
            gi, gh = w_ih @ sd["embed.weight"][t] + b_ih, w_hh @ h + b_hh
            r = torch.sigmoid(gi[:EMBED] + gh[:EMBED])
            z = torch.sigmoid(gi[EMBED : 2 * EMBED] + gh[EMBED : 2 * EMBED])
            n = torch.tanh(gi[2 * EMBED :] + r * gh[2 * EMBED :])
            h = (1 - z) * n + z * h
        out.append(h / h.pow(2).sum().sqrt())
    return torch.stack(out)


@pytest.mark.parametrize("feature_shape", [(IMAGE_DIM,), (4, IMAGE_DIM)], ids=["2d-features", "regions"])
def test_original_file_and_pickled_vocab_score_like_the_original_forward(tmp_path: Path,
                                                                          feature_shape: tuple) -> None:
    words = [*SPECIALS, "a", "dog", "runs", "on", "grass", "."]
    vocab_path = write_vsepp_pickle(tmp_path / "vocab" / "f30k_precomp_vocab.pkl", words)
    states = original_states(len(words))
    ckpt = save_original(tmp_path / "model_best.pth.tar", states)
    loaded = load_model(ckpt, vocab=str(vocab_path))
    assert loaded.config.model.name == "vsepp" and loaded.config.model.vocab_size == len(words)
    gen = torch.Generator().manual_seed(1)
    feats = torch.rand(3, *feature_shape, generator=gen)
    sentences = ["a dog runs on grass .", "a dog .", "grass on a dog runs a dog .", "unknown words here"]
    tokens = [loaded.vocab.encode(s) for s in sentences]
    assert tokens[1] == [1, 4, 5, 9, 2]  # <start> a dog . <end>, ids from the pickle
    captions, lengths = pad_captions(tokens)
    with torch.no_grad():
        got = loaded.model.similarity(loaded.model.encode_image(feats),
                                      loaded.model.encode_text(captions, lengths)).double()
    want = by_hand_image(states, feats) @ by_hand_text(states, tokens).T
    delta = (got - want).abs().max().item()
    print(f"VSE++ import {feature_shape}: max |sims - by-hand| = {delta:.2e}")
    assert delta < 1e-5


def test_detection_leaves_the_other_originals_alone() -> None:
    img, txt = original_states(8)
    assert vsepp_ckpt.detect({"model": [img, txt], "opt": original_opt()})
    scan_opt = original_opt(cross_attn="t2i", lambda_softmax=9.0, raw_feature_norm="clipped_l2norm",
                            agg_func="LogSumExp", lambda_lse=6.0)
    bigru = txt | {k + "_reverse": v for k, v in txt.items() if k.startswith("rnn.")}
    others = {
        "scan": {"model": [img, txt], "opt": scan_opt},  # SCAN, basic fc, unidirectional GRU: SCAN's options
        "scan bi-GRU": {"model": [img, bigru], "opt": scan_opt},
        "vsrn": {"model": [img | {"Rs_GCN_1.g.weight": torch.zeros(1)}, txt], "opt": original_opt()},
        "vse_infinity": {"model": [img | {"gpool.linear.weight": torch.zeros(1)}, bigru], "opt": original_opt()},
        "weight-normed fc": {"model": [{"fc.weight_g": torch.zeros(()), "fc.weight_v": img["fc.weight"],
                                        "fc.bias": img["fc.bias"]}, txt], "opt": scan_opt},
        "gsmn": {"model": [img, txt, {"graph_convolution_1.x": torch.zeros(1)}, {}], "opt": original_opt()},
    }
    for name, ckpt in others.items():
        assert not vsepp_ckpt.detect(ckpt), name
    first = next(spec.name for spec, imp in importers() if imp.detect(others["scan"]))
    assert first == "scan"


@pytest.mark.parametrize("change,match", [
    ("measure", "order-embedding"),
    ("cnn", "raw-image"),
    ("hidden", "GRU size"),
])
def test_what_cannot_be_imported_is_one_clear_line(change: str, match: str) -> None:
    img, txt = original_states(8)
    opt = original_opt()
    if change == "measure":
        opt = original_opt(measure="order", use_abs=True)
    elif change == "cnn":
        img = img | {"cnn.module.conv1.weight": torch.zeros(1)}
    else:
        txt = txt | {"rnn.weight_hh_l0": torch.zeros(3 * (EMBED + 1), EMBED + 1)}
    with pytest.raises(CheckpointError, match=match):
        vsepp_ckpt.convert({"model": [img, txt], "opt": opt})


def _vsepp_split(root: Path, n_img: int, words: list[str], dim: int, two_d: bool, seed: int = 0) -> Path:
    """A test split with 2-D (VSE++ precomp) or region features, and the pickled vocab where the original keeps
    it (DATA/vocab/{data_name}_vocab.pkl) as the only vocabulary."""
    write_tiny_dataset(root, {"test": n_img}, regions=3, dim=dim, seed=seed)
    (root / "vocab.json").unlink()
    if two_d:
        feats = np.load(root / "test_ims.npy")
        np.save(root / "test_ims.npy", feats.mean(1))
    write_vsepp_pickle(root.parent / "vocab" / f"{root.name}_vocab.pkl", words)
    return root


@pytest.mark.parametrize("two_d", [True, False], ids=["2d-features", "regions"])
def test_eval_cli_on_an_original_file(tmp_path: Path, two_d: bool, capsys) -> None:
    from tests.conftest import WORDS

    words = [*SPECIALS, *dict.fromkeys(WORDS), "."]
    root = _vsepp_split(tmp_path / "data" / "f30k_precomp", 4, words, IMAGE_DIM, two_d)
    states = original_states(len(words), seed=3)
    ckpt = save_original(tmp_path / "model_best.pth.tar", states)
    out = tmp_path / "res.json"
    assert main(["-q", "eval", str(ckpt), "--data", str(root), "--out", str(out)]) == 0  # vocab found as .pkl
    results = json.loads(out.read_text())
    # the same protocol on a by-hand similarity matrix
    from itmatch.data.precomp import PrecompSplit
    from itmatch.data.vocab import load_vocab
    from itmatch.evaluation import evaluate_sims

    split = PrecompSplit(root, "test")
    vocab = load_vocab(root.parent / "vocab" / "f30k_precomp_vocab.pkl")
    feats = torch.from_numpy(np.asarray(split.images[np.arange(4)]))
    sims = by_hand_image(states, feats) @ by_hand_text(states, [vocab.encode(c) for c in split.captions]).T
    want = evaluate_sims(sims.numpy())
    assert results["rsum"] == pytest.approx(want["rsum"])
    assert results["i2t"] == pytest.approx(want["i2t"]) and results["t2i"] == pytest.approx(want["t2i"])


def test_eval_hint_for_a_missing_vocabulary_names_the_eval_flag(tmp_path: Path, capsys) -> None:
    root = write_tiny_dataset(tmp_path / "data" / "f30k_precomp", {"test": 2}, regions=3, dim=IMAGE_DIM)
    (root / "vocab.json").unlink()
    ckpt = save_original(tmp_path / "model_best.pth.tar", original_states(9))
    assert main(["-q", "eval", str(ckpt), "--data", str(root)]) == 2
    err = capsys.readouterr().err
    assert "--vocab PATH" in err and "--set data.vocab" not in err and "f30k_precomp_vocab.pkl" in err
