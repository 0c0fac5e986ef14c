"""VSRN's released checkpoints: files in the original layout load strictly and reproduce the source model."""

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itmatch.checkpoints.loader import load_model, load_state_strict
from itmatch.cli import main
from itmatch.config import load_preset
from itmatch.data.vocab import load_vocab
from itmatch.errors import CheckpointError
from itmatch.models import vsrn as vsrn_ckpt
from itmatch.registry import create_model
from tests.test_vsrn import DIM, IMAGE_DIM, randomise_batch_norms, sample_inputs


class UpstreamGcn(nn.Module):
    """GCN_lib/Rs_GCN.py as the reference describes it: 1x1 Conv1d on (B, D, N), W = Conv1d + BatchNorm1d."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.g = nn.Conv1d(d, d, 1)
        self.W = nn.Sequential(nn.Conv1d(d, d, 1), nn.BatchNorm1d(d))
        self.theta = nn.Conv1d(d, d, 1)
        self.phi = nn.Conv1d(d, d, 1)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        g = self.g(v).permute(0, 2, 1)
        r = self.theta(v).permute(0, 2, 1) @ self.phi(v) / v.shape[2]
        return self.W((r @ g).permute(0, 2, 1)) + v


class UpstreamVsrn(nn.Module):
    """EncoderImagePrecompAttn + EncoderText in the original key layout, forward written from the reference."""

    def __init__(self, data_name: str, vocab_size: int) -> None:
        super().__init__()
        self.data_name = data_name
        self.fc = nn.Linear(IMAGE_DIM, DIM)
        self.img_rnn = nn.GRU(DIM, DIM, 1, batch_first=True)
        for k in range(1, 5):
            setattr(self, f"Rs_GCN_{k}", UpstreamGcn(DIM))
        if data_name == "f30k_precomp":
            self.bn = nn.BatchNorm1d(DIM)
        self.embed = nn.Embedding(vocab_size, 5)
        self.rnn = nn.GRU(5, DIM, 1, batch_first=True)

    def image(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x)
        if self.data_name != "f30k_precomp":
            x = x / x.pow(2).sum(dim=1, keepdim=True).sqrt()
        v = x.permute(0, 2, 1)
        for k in range(1, 5):
            v = getattr(self, f"Rs_GCN_{k}")(v)
        g = v.permute(0, 2, 1)
        g = g / g.pow(2).sum(dim=1, keepdim=True).sqrt()
        f = self.img_rnn(g)[1][0]
        if self.data_name == "f30k_precomp":
            f = self.bn(f)
        return f / f.norm(dim=1, keepdim=True)

    def text(self, captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.embed(captions), lengths, batch_first=True, enforce_sorted=False)
        out = pad_packed_sequence(self.rnn(packed)[0], batch_first=True)[0]
        out = out[torch.arange(len(lengths)), lengths - 1]
        return out / out.norm(dim=1, keepdim=True)

    def official(self) -> dict:
        """The dict train.py:save_checkpoint writes: model = [image state, text state], a pickled Namespace."""
        sd = self.state_dict()
        img = {k: v for k, v in sd.items() if not k.startswith(("embed.", "rnn."))}
        txt = {k: v for k, v in sd.items() if k.startswith(("embed.", "rnn."))}
        opt = argparse.Namespace(data_name=self.data_name, embed_size=DIM, img_dim=IMAGE_DIM, word_dim=5,
                                 vocab_size=self.embed.num_embeddings, max_len=60, dim_hidden=512, dim_word=300,
                                 input_dropout_p=0.2, learning_rate=2e-4, max_violation=True)
        return {"epoch": 3, "model": [img, txt], "best_rsum": 123.4, "opt": opt, "Eiters": 77}


def upstream_model(data_name: str, vocab_size: int, seed: int) -> UpstreamVsrn:
    torch.manual_seed(seed)
    model = UpstreamVsrn(data_name, vocab_size)
    for m in model.modules():  # non-zero W.1 so the graph reasoning is not the identity
        if isinstance(m, UpstreamGcn):
            nn.init.uniform_(m.W[1].weight, 0.5, 1.5)
    randomise_batch_norms(model, seed)
    return model.eval()


def save_official(model: UpstreamVsrn, path: Path, *, legacy: bool = False) -> Path:
    torch.save(model.official(), path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("data_name,legacy", [("f30k_precomp", False), ("coco_precomp", True)])
def test_official_checkpoint_reproduces_the_source_similarities(tiny_data: Path, tmp_path: Path, data_name: str,
                                                                legacy: bool) -> None:
    vocab_path = tiny_data / "vocab.json"
    n_words = len(load_vocab(vocab_path))
    source = upstream_model(data_name, n_words, seed=1)
    path = save_official(source, tmp_path / "model_best.pth.tar", legacy=legacy)
    loaded = load_model(path, vocab=str(vocab_path))
    cfg = loaded.config.model
    assert (cfg.fc_region_norm, cfg.final_bn) == (data_name != "f30k_precomp", data_name == "f30k_precomp")
    assert (cfg.embed_dim, cfg.image_dim, cfg.word_dim, cfg.vocab_size, cfg.gcn_layers) == (DIM, IMAGE_DIM, 5,
                                                                                             n_words, 4)
    images, captions, lengths = sample_inputs(n_words)
    with torch.no_grad():
        expected = source.image(images) @ source.text(captions, lengths).T
        model = loaded.model
        sims = model.similarity(model.encode_image(images), model.encode_text(captions, lengths))
    torch.testing.assert_close(sims, expected, rtol=1e-5, atol=1e-6)


def test_convert_is_pure_and_squeezes_the_conv_kernels() -> None:
    official = upstream_model("f30k_precomp", 30, seed=2).official()
    before = {k: v.clone() for k, v in official["model"][0].items()}
    cfg, state = vsrn_ckpt.convert(official)
    assert state["img_enc.gcn.3.w.weight"].shape == (DIM, DIM)
    assert official["model"][0]["Rs_GCN_4.W.0.weight"].shape == (DIM, DIM, 1)
    assert all(torch.equal(before[k], v) for k, v in official["model"][0].items())
    torch.testing.assert_close(state["img_enc.gcn.0.bn.running_var"], official["model"][0]["Rs_GCN_1.W.1.running_var"])
    assert not any(k.startswith("caption") for k in state)


def test_coco_checkpoint_refused_by_an_f30k_model(tmp_path: Path, tiny_data: Path, capsys) -> None:
    n_words = len(load_vocab(tiny_data / "vocab.json"))
    official = upstream_model("coco_precomp", n_words, seed=3).official()
    _, state = vsrn_ckpt.convert(official)
    preset = load_preset("vsrn_f30k_precomp").model
    f30k = create_model(dataclasses.replace(preset, image_dim=IMAGE_DIM, embed_dim=DIM, word_dim=5,
                                            vocab_size=n_words, caption_loss_weight=0.0))
    with pytest.raises(CheckpointError, match=r"missing keys \['img_enc.bn.bias'") as info:
        load_state_strict(f30k, state, "coco.pth.tar")
    assert "\n" not in str(info.value)
    # A file claiming f30k_precomp without the final batch norm: one line from `itmatch eval` as well.
    official["opt"].data_name = "f30k_precomp"
    torch.save(official, tmp_path / "mislabelled.pth.tar")
    code = main(["-q", "eval", str(tmp_path / "mislabelled.pth.tar"), "--data", str(tiny_data),
                 "--vocab", str(tiny_data / "vocab.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "missing keys ['img_enc.bn.bias'" in err, err


def test_eval_of_official_files_and_their_ensemble(tiny_data: Path, tmp_path: Path, capsys) -> None:
    from itmatch.data.precomp import PrecompSplit
    from itmatch.evaluation import evaluate_sims
    from itmatch.inference import compute_sims

    vocab_path = tiny_data / "vocab.json"
    n_words = len(load_vocab(vocab_path))
    a = save_official(upstream_model("f30k_precomp", n_words, seed=4), tmp_path / "model_fliker_1.pth.tar")
    b = save_official(upstream_model("f30k_precomp", n_words, seed=5), tmp_path / "model_fliker_2.pth.tar")
    split = PrecompSplit(tiny_data, "test")
    sims = [compute_sims(load_model(p, vocab=str(vocab_path)).model, split, load_vocab(vocab_path)) for p in (a, b)]
    for paths, expected in (([a], sims[0]), ([a, b], (sims[0] + sims[1]) / 2)):
        out = tmp_path / "r.json"
        code = main(["-q", "eval", *map(str, paths), "--data", str(tiny_data), "--split", "test",
                     "--vocab", str(vocab_path), "--out", str(out), "--force"])  # r.json is replaced
        assert code == 0, capsys.readouterr().err
        assert json.loads(out.read_text())["rsum"] == pytest.approx(evaluate_sims(expected)["rsum"])
    assert sims[0].tolist() != sims[1].tolist()


class NotANamespace:
    data_name = "f30k_precomp"


def test_official_files_load_without_running_pickled_code(tiny_data: Path, tmp_path: Path, capsys) -> None:
    official = upstream_model("coco_precomp", 30, seed=6).official()
    official["opt"] = NotANamespace()
    torch.save(official, tmp_path / "evil.pth.tar")
    with pytest.raises(CheckpointError, match="refusing to load: the file pickles .*NotANamespace") as info:
        load_model(tmp_path / "evil.pth.tar", vocab=str(tiny_data / "vocab.json"))
    assert "\n" not in str(info.value)


def test_official_files_need_their_vocabulary(tiny_data: Path, tmp_path: Path, capsys) -> None:
    n_words = len(load_vocab(tiny_data / "vocab.json"))
    path = save_official(upstream_model("coco_precomp", n_words + 1, seed=7), tmp_path / "m.pth.tar")
    # Without --vocab the dataset's own vocabulary is tried (as training finds it); either way the size is checked.
    for extra, match in (([], "gives 17 ids but"), (["--vocab", str(tiny_data / "vocab.json")], "gives 17 ids but")):
        code = main(["-q", "eval", str(path), "--data", str(tiny_data), *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and match in err, err
