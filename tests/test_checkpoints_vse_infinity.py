"""Released VSE-infinity checkpoints: upstream key names, `module.` prefixes and a pickled argparse.Namespace load
strictly and reproduce the source model; anything that does not fit is one clear line; pickles cannot run code."""

import argparse
from pathlib import Path

import pytest
import torch

from itmatch.checkpoints.loader import load_model
from itmatch.cli import main
from itmatch.data.vocab import Vocabulary, load_vocab, save_vocab
from itmatch.errors import CheckpointError
from itmatch.models.vse_infinity import VseInfinityConfig
from itmatch.registry import create_model
from tests.test_models import IMAGE_DIM, VOCAB, tiny_batch

# Key names of upstream's encoders (spec A.4.4), written out independently of our module names.
GRU = [f"{w}_l0{d}" for d in ("", "_reverse") for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
BN = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
IMAGE_KEYS = {"fc.weight", "fc.bias", *(f"mlp.layers.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")),
              *(f"mlp.bns.{i}.{p}" for i in (0, 1) for p in BN), *(f"gpool.gru.{g}" for g in GRU),
              "gpool.linear.weight"}
BIGRU_TEXT_KEYS = {"embed.weight", *(f"rnn.{g}" for g in GRU), *(f"gpool.gru.{g}" for g in GRU),
                   "gpool.linear.weight"}


def source_model(text_encoder: str, bert: Path | None = None, image_dim: int = IMAGE_DIM, vocab_size: int = VOCAB):
    torch.manual_seed(1)
    cfg = VseInfinityConfig(image_dim=image_dim, embed_dim=16, vocab_size=vocab_size, word_dim=8,
                            text_encoder=text_encoder, bert_path=str(bert or ""))
    model = create_model(cfg)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a lost buffer would show
        for bn in model.img_enc.mlp.bns:
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def upstream_states(model, text_encoder: str) -> list[dict[str, torch.Tensor]]:
    """What upstream's `[img_enc.state_dict(), txt_enc.state_dict()]` holds for this model."""
    image = {k.removeprefix("img_enc."): v.clone() for k, v in model.state_dict().items() if k.startswith("img_enc.")}
    text = {k.removeprefix("txt_enc.").removeprefix("gru."): v.clone() for k, v in model.state_dict().items()
            if k.startswith("txt_enc.")}
    assert set(image) == IMAGE_KEYS
    if text_encoder == "bigru":
        assert set(text) == BIGRU_TEXT_KEYS
    else:
        assert {"linear.weight", "linear.bias", "bert.pooler.dense.weight", "bert.embeddings.word_embeddings.weight",
                "bert.encoder.layer.1.attention.self.query.weight"} <= set(text)
        text["bert.embeddings.position_ids"] = torch.arange(64)[None]  # saved by transformers < 4.31
        image = {f"module.{k}": v for k, v in image.items()}  # DataParallel, always on the BERT branch
        text = {f"module.{k}": v for k, v in text.items()}
    return [image, text]


def write_official(path: Path, states: list[dict], *, legacy: bool = False) -> Path:
    opt = argparse.Namespace(img_dim=IMAGE_DIM, embed_size=16, precomp_enc_type="basic", no_imgnorm=False,
                             no_txtnorm=False, vse_mean_warmup_epochs=1, learning_rate=5e-4, data_name="f30k")
    torch.save({"epoch": 25, "model": states, "best_rsum": 500.0, "opt": opt, "Eiters": 1234}, path,
               _use_new_zipfile_serialization=not legacy)
    return path


def write_vocab(path: Path, n_words: int) -> Path:
    vocab = Vocabulary()
    for word in ["<pad>", "<start>", "<end>", "<unk>", *(f"w{i}" for i in range(n_words - 4))]:
        vocab.add_word(word)
    save_vocab(vocab, path)
    return path


def sims(model) -> torch.Tensor:
    images, captions, lengths = tiny_batch()
    with torch.no_grad():
        return model.similarity(model.encode_image(images), model.encode_text(captions, lengths))


@pytest.mark.parametrize("legacy", [False, True])
def test_bigru_release_reproduces_its_model(tmp_path: Path, legacy: bool) -> None:
    src = source_model("bigru")
    path = write_official(tmp_path / "model_best.pth", upstream_states(src, "bigru"), legacy=legacy)
    vocab = write_vocab(tmp_path / "f30k_precomp_vocab.json", VOCAB - 1)  # upstream appends <mask>: rows = json + 1
    loaded = load_model(path, vocab=str(vocab))
    assert loaded.config.model.vocab_size == VOCAB and len(loaded.vocab) == VOCAB
    assert loaded.vocab("<mask>") == VOCAB - 1
    assert torch.equal(sims(loaded.model), sims(src))


def test_bert_release_with_module_prefixes_reproduces_its_model(tmp_path: Path, tiny_bert: Path) -> None:
    src = source_model("bert", tiny_bert)
    path = write_official(tmp_path / "model_best.pth", upstream_states(src, "bert"))
    loaded = load_model(path, bert_path=str(tiny_bert))
    assert loaded.config.model.text_encoder == "bert"
    assert torch.equal(sims(loaded.model), sims(src))
    with pytest.raises(CheckpointError, match="--bert-path"):
        load_model(path)


@pytest.mark.parametrize("change,match", [
    ("drop gpool", "missing keys ['img_enc.gpool.linear.weight']"),
    ("extra key", "unexpected keys ['img_enc.attention.weight']"),
    ("wrong vocab", "pass the vocabulary the model was trained with"),
    ("no vocab", "needs --vocab"),
])
def test_mismatches_are_one_clear_line(tmp_path: Path, change: str, match: str) -> None:
    image, text = upstream_states(source_model("bigru"), "bigru")
    if change == "drop gpool":
        del image["gpool.linear.weight"]
    if change == "extra key":
        image["attention.weight"] = torch.zeros(2)
    path = write_official(tmp_path / "model_best.pth", [image, text])
    words = VOCAB - (2 if change == "wrong vocab" else 1)
    vocab = "" if change == "no vocab" else str(write_vocab(tmp_path / "v.json", words))
    with pytest.raises(CheckpointError, match=match.replace("[", r"\[").replace("]", r"\]")) as info:
        load_model(path, vocab=vocab)
    assert "\n" not in str(info.value)


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"
    image, text = upstream_states(source_model("bigru"), "bigru")
    path = tmp_path / "evil.pth"
    torch.save({"epoch": 1, "model": [image, text], "opt": Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load: the file pickles posix\.system") as info:
        load_model(path, vocab=str(write_vocab(tmp_path / "v.json", VOCAB - 1)))
    assert "\n" not in str(info.value)
    assert main(["-q", "eval", str(path)]) == 2
    assert capsys.readouterr().err.startswith("itmatch: error: ")
    assert not marker.exists()


def test_unknown_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "opt": argparse.Namespace()}, path)
    with pytest.raises(CheckpointError, match="neither an itmatch checkpoint nor a release"):
        load_model(path)


def upstream_grid_states(model) -> list[dict[str, torch.Tensor]]:
    """Upstream grid layout: `backbone.resnet.*` (with its classifier) plus the same tensors as `backbone.base.*` /
    `backbone.top.0.*`, `image_encoder.{fc,gpool}.*`, everything under `module.` (DataParallel)."""
    image: dict[str, torch.Tensor] = {}
    base_of = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6"}
    for key, value in model.state_dict().items():
        if key.startswith("img_enc.backbone."):
            rest = key.removeprefix("img_enc.backbone.")
            head, name = rest.split(".", 1)
            image[f"backbone.resnet.{rest}"] = value.clone()
            dup = f"backbone.top.0.{name}" if head == "layer4" else f"backbone.base.{base_of[head]}.{name}"
            image[dup] = image[f"backbone.resnet.{rest}"]
        elif key.startswith("img_enc.image_encoder."):
            image[key.removeprefix("img_enc.")] = value.clone()
    image["backbone.resnet.fc.weight"], image["backbone.resnet.fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    assert {"image_encoder.fc.weight", "image_encoder.gpool.linear.weight", "backbone.base.6.0.bn3.running_var",
            "backbone.top.0.2.conv3.weight", "backbone.resnet.layer4.2.conv3.weight"} <= set(image)
    text = {k.removeprefix("txt_enc.").removeprefix("gru."): v.clone() for k, v in model.state_dict().items()
            if k.startswith("txt_enc.")}
    return [{f"module.{k}": v for k, v in image.items()}, {f"module.{k}": v for k, v in text.items()}]


def test_grid_release_loads_strictly_and_reproduces_the_model(tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = create_model(VseInfinityConfig(embed_dim=16, vocab_size=VOCAB, word_dim=8, backbone="butd_resnet101"))
    with torch.no_grad():
        src.img_enc.backbone.layer1[0].bn1.running_mean.uniform_(-0.5, 0.5)
    src.eval()
    states = upstream_grid_states(src)
    write_vocab(tmp_path / "vocab.json", VOCAB - 1)  # + <mask> appended by the bigru branch
    opt = argparse.Namespace(img_dim=2048, embed_size=16, precomp_enc_type="backbone", backbone_source="detector",
                             input_scale_factor=2.0, no_imgnorm=False, no_txtnorm=False, vse_mean_warmup_epochs=1)
    torch.save({"epoch": 25, "model": states, "best_rsum": 1.0, "opt": opt, "Eiters": 9}, tmp_path / "grid.pth")
    loaded = load_model(tmp_path / "grid.pth", vocab=str(tmp_path / "vocab.json"))
    assert loaded.config.model.backbone == "butd_resnet101"
    assert (loaded.config.data.source, loaded.config.data.input_scale_factor) == ("images", 2.0)
    images = torch.randn(2, 3, 64, 64)
    _, captions, lengths = tiny_batch(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(images).emb, src.encode_image(images).emb)
        torch.testing.assert_close(loaded.model.encode_text(captions, lengths).emb,
                                   src.encode_text(captions, lengths).emb)


def test_grid_release_with_inconsistent_duplicates_is_refused() -> None:
    from itmatch.models.vse_infinity import convert

    torch.manual_seed(1)
    src = create_model(VseInfinityConfig(embed_dim=16, vocab_size=VOCAB, word_dim=8, backbone="resnet50"))
    states = upstream_grid_states(src)
    key = "module.backbone.top.0.0.conv1.weight"
    states[0][key] = torch.zeros_like(states[0][key])
    opt = argparse.Namespace(precomp_enc_type="backbone", backbone_source="imagenet_res50")
    with pytest.raises(CheckpointError, match="backbone.top.0.0.conv1.weight differs"):
        convert({"model": states, "opt": opt})
    opt.backbone_source = "clip"
    with pytest.raises(CheckpointError, match="unknown backbone_source 'clip'"):
        convert({"model": states, "opt": opt})


def test_cli_evaluates_a_release_on_a_dataset(tiny_data: Path, tmp_path: Path, capsys) -> None:
    vocab = load_vocab(tiny_data / "vocab.json")
    src = source_model("bigru", image_dim=8, vocab_size=len(vocab) + 1)
    path = write_official(tmp_path / "model_best.pth", upstream_states(src, "bigru"))
    code = main(["-q", "eval", str(path), "--data", str(tiny_data), "--split", "test", "--vocab",
                 str(tiny_data / "vocab.json"), "--out", str(tmp_path / "r.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "rsum" in out
    code = main(["-q", "eval", str(path), "--split", "test", "--vocab", str(tiny_data / "vocab.json")])
    assert code == 2 and "pass --data DIR" in capsys.readouterr().err
