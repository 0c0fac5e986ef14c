"""SCAN: original checkpoints load strictly and safely and reproduce the source model's similarities."""

import argparse
import json
import os
from pathlib import Path

import pytest
import torch

from itmatch.checkpoints.loader import load_model
from itmatch.cli import main
from itmatch.data.precomp import load_split
from itmatch.errors import CheckpointError
from itmatch.inference import compute_sims
from itmatch.models.scan import ScanConfig
from itmatch.registry import create_model


def original_opt(**overrides) -> argparse.Namespace:
    """The options SCAN's train.py pickles into its checkpoints (a representative subset)."""
    opt = dict(data_path="/home/someone/data", data_name="f30k_precomp", vocab_path="./vocab/", margin=0.2,
               num_epochs=30, batch_size=128, word_dim=300, embed_size=1024, grad_clip=2.0, learning_rate=0.0002,
               lr_update=15, workers=10, log_step=10, val_step=500, logger_name="runs/log", model_name="runs/log",
               resume="", max_violation=True, img_dim=2048, no_imgnorm=False, no_txtnorm=False,
               raw_feature_norm="clipped_l2norm", agg_func="LogSumExp", cross_attn="t2i", precomp_enc_type="basic",
               bi_gru=True, lambda_lse=6.0, lambda_softmax=9.0, num_layers=1, vocab_size=0)
    opt.update(overrides)
    return argparse.Namespace(**opt)


def write_original(model, path: Path, opt: argparse.Namespace) -> None:
    """Save like SCAN's train.py: 'model' = [img_enc state, txt_enc state], legacy (non-zip) format."""
    img = {k.removeprefix("img_enc."): v for k, v in model.state_dict().items() if k.startswith("img_enc.")}
    img = {k.replace("parametrizations.weight.original0", "weight_g")
            .replace("parametrizations.weight.original1", "weight_v"): v for k, v in img.items()}
    txt = {k.removeprefix("txt_enc."): v for k, v in model.state_dict().items() if k.startswith("txt_enc.")}
    ckpt = {"epoch": 11, "model": [img, txt], "best_rsum": 452.2, "opt": opt, "Eiters": 30000}
    torch.save(ckpt, path, _use_new_zipfile_serialization=False, pickle_protocol=2)


@pytest.mark.parametrize("cross_attn,agg,enc", [("t2i", "LogSumExp", "basic"), ("i2t", "Mean", "basic"),
                                                ("t2i", "Max", "weight_norm")])
def test_original_checkpoint_reproduces_similarities(tiny_data: Path, tmp_path: Path, cross_attn: str, agg: str,
                                                     enc: str) -> None:
    split, vocab = load_split(tiny_data, "test")
    torch.manual_seed(0)
    cfg = ScanConfig(image_dim=8, embed_dim=16, word_dim=12, vocab_size=len(vocab), cross_attn=cross_attn,
                     agg_func=agg, precomp_enc_type=enc, lambda_softmax=4.0, lambda_lse=5.0)
    source = create_model(cfg).eval()
    opt = original_opt(cross_attn=cross_attn, agg_func=agg, precomp_enc_type=enc, img_dim=8, embed_size=16,
                       word_dim=12, lambda_softmax=4.0, lambda_lse=5.0, vocab_size=len(vocab))
    path = tmp_path / "model_best.pth.tar"
    write_original(source, path, opt)
    loaded = load_model(path, vocab=str(tiny_data / "vocab.json"))
    assert loaded.config.model == cfg
    want = compute_sims(source, split, vocab)
    got = compute_sims(loaded.model, split, loaded.vocab)
    assert (got == want).all()


def test_missing_key_and_wrong_vocab_are_one_line(tiny_data: Path, tmp_path: Path) -> None:
    _, vocab = load_split(tiny_data, "test")
    source = create_model(ScanConfig(image_dim=8, embed_dim=16, word_dim=12, vocab_size=len(vocab)))
    path = tmp_path / "m.pth.tar"
    write_original(source, path, original_opt())
    ckpt = torch.load(path, weights_only=False)
    del ckpt["model"][1]["rnn.bias_hh_l0_reverse"]
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"missing keys \['txt_enc.rnn.bias_hh_l0_reverse'\]") as info:
        load_model(path, vocab=str(tiny_data / "vocab.json"))
    assert "\n" not in str(info.value)
    write_original(source, path, original_opt())
    small = tmp_path / "small_vocab.json"
    words = {w: i for i, w in enumerate(["<pad>", "<start>", "<end>", "<unk>", "red"])}
    small.write_text(json.dumps({"word2idx": words, "idx2word": {str(i): w for w, i in words.items()}, "idx": 5}))
    with pytest.raises(CheckpointError, match="pass the vocabulary the model was trained with"):
        load_model(path, vocab=str(small))


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_not_run(tiny_data: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    _, vocab = load_split(tiny_data, "test")
    source = create_model(ScanConfig(image_dim=8, embed_dim=16, word_dim=12, vocab_size=len(vocab)))
    path = tmp_path / "evil.pth.tar"
    write_original(source, path, original_opt(logger_name=payload))
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model(path, vocab=str(tiny_data / "vocab.json"))
    assert not marker.exists()


def test_cli_ensemble_of_t2i_and_i2t_averages_the_matrices(tiny_data: Path, tmp_path: Path, capsys) -> None:
    split, vocab = load_split(tiny_data, "test")
    paths, sims = [], []
    for i, direction in enumerate(("t2i", "i2t")):
        torch.manual_seed(i)
        cfg = ScanConfig(image_dim=8, embed_dim=16, word_dim=12, vocab_size=len(vocab), cross_attn=direction)
        model = create_model(cfg).eval()
        paths.append(tmp_path / f"{direction}.pth.tar")
        write_original(model, paths[-1], original_opt(cross_attn=direction, vocab_size=len(vocab)))
        sims.append(compute_sims(model, split, vocab))
    out = tmp_path / "ens.json"
    code = main(["-q", "eval", *map(str, paths), "--data", str(tiny_data), "--split", "test", "--out", str(out)])
    assert code == 0
    from itmatch.evaluation import evaluate_sims

    expected = evaluate_sims((sims[0] + sims[1]) / 2)
    got = json.loads(out.read_text())
    assert got["rsum"] == pytest.approx(expected["rsum"]) and got["i2t"] == pytest.approx(expected["i2t"])


def test_scan_trains_end_to_end(tiny_data: Path, tmp_path: Path, capsys) -> None:
    code = main(["-q", "train", "--preset", "scan_synth_t2i_avg", "--data", str(tiny_data), "--out",
                 str(tmp_path / "run"), "--set", "model.embed_dim=16", "--set", "model.word_dim=8",
                 "--set", "data.batch_size=16", "--set", "train.epochs=1", "--test"])
    assert code == 0 and "rsum" in capsys.readouterr().out


@pytest.mark.parametrize("norm", ["clipped", "no_norm"])
def test_unnormalised_regions_score_finitely_like_upstreams_softmax(norm: str) -> None:
    # no_imgnorm + a raw norm that does not bound the logits: upstream's nn.Softmax stays finite, so must we.
    from tests.test_cross_attention import shifted_softmax_pair

    torch.manual_seed(0)
    cfg = ScanConfig(image_dim=8, embed_dim=16, word_dim=12, vocab_size=20, cross_attn="t2i", agg_func="Mean",
                     raw_feature_norm=norm, no_imgnorm=True, lambda_softmax=9.0)
    model = create_model(cfg).eval()
    images = torch.rand(3, 5, 8) * 200.0  # raw detector features are large and un-normalised
    captions = torch.randint(4, 20, (4, 6))
    lengths = torch.tensor([6, 5, 3, 2])
    with torch.no_grad():
        img, txt = model.encode_image(images), model.encode_text(captions, lengths)
        sims = model.similarity(img, txt)
    assert torch.isfinite(sims).all()
    want = torch.tensor([[shifted_softmax_pair(img.emb[i], txt.emb[c, : lengths[c]], model.xattn)
                          for c in range(4)] for i in range(3)], dtype=torch.float64)
    assert (sims.double() - want).abs().max().item() <= 1e-4
