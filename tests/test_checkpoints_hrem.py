"""Released HREM checkpoints: the original layout ({'model': [image state, text state], 'opt': Namespace}) loads
strictly and reproduces the source model's similarities; anything that does not fit is one clear line."""

import argparse
from pathlib import Path

import pytest
import torch

from itmatch.checkpoints.loader import load_model
from itmatch.errors import CheckpointError
from itmatch.models import hrem, vse_infinity
from itmatch.models.hrem import HremConfig
from itmatch.registry import create_model
from tests.test_hrem import AGGR, UPSTREAM_IMAGE
from tests.test_models import IMAGE_DIM, tiny_batch


def source_model(bert: Path):
    torch.manual_seed(1)
    model = create_model(HremConfig(image_dim=IMAGE_DIM, embed_dim=16, nhead=4, residual_weight=0.7,
                                    bert_path=str(bert)))
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a lost buffer would show
        for bn in model.img_enc.fc.mlp.bns:
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def upstream_states(model, prefix: str = "") -> list[dict[str, torch.Tensor]]:
    """What upstream's `[img_enc.state_dict(), txt_enc.state_dict()]` holds for this model."""
    image = {k.removeprefix("img_enc."): v.clone() for k, v in model.state_dict().items() if k.startswith("img_enc.")}
    text = {k.removeprefix("txt_enc."): v.clone() for k, v in model.state_dict().items() if k.startswith("txt_enc.")}
    assert set(image) == UPSTREAM_IMAGE | AGGR
    assert {"linear.weight", "linear.bias", "bert.pooler.dense.weight"} | AGGR <= set(text)
    text["bert.embeddings.position_ids"] = torch.arange(64)[None]  # saved by transformers < 4.31
    return [{prefix + k: v for k, v in image.items()}, {prefix + k: v for k, v in text.items()}]


def hrem_opt(**kw) -> argparse.Namespace:
    opt = dict(dataset="f30k", embed_size=16, img_dim=IMAGE_DIM, nhead=4, dropout=0.1, residual_weight=0.7,
               no_imgnorm=False, no_txtnorm=False, warmup=8000, mask_weight=1.0, threshold=0.5, topk=10,
               reg_loss_weight=10, norm_input=1, cross_loss=1, num_layers_enc=1, graph_lr_factor=1.0,
               base_loss="trip", gnn_loss="trip", batch_size=128, multi_gpu=0)
    return argparse.Namespace(**(opt | kw))


def write_official(path: Path, states: list[dict], opt: argparse.Namespace | None = None, *,
                   legacy: bool = False) -> Path:
    torch.save({"model": states, "opt": opt or hrem_opt(), "epoch": 20, "best_rsum": 520.0, "Eiters": 22640}, path,
               _use_new_zipfile_serialization=not legacy)
    return path


def sims(model) -> torch.Tensor:
    images, captions, lengths = tiny_batch()
    with torch.no_grad():
        return model.similarity(model.encode_image(images), model.encode_text(captions, lengths))


@pytest.mark.parametrize("prefix,legacy", [("", False), ("module.", False), ("", True)])
def test_release_reproduces_its_model(tmp_path: Path, tiny_bert: Path, prefix: str, legacy: bool) -> None:
    src = source_model(tiny_bert)
    path = write_official(tmp_path / "model_best.pth", upstream_states(src, prefix), legacy=legacy)
    loaded = load_model(path, bert_path=str(tiny_bert))
    m = loaded.config.model
    assert (m.name, m.embed_dim, m.image_dim, m.nhead, m.residual_weight) == ("hrem", 16, IMAGE_DIM, 4, 0.7)
    assert torch.equal(sims(loaded.model), sims(src))
    assert not loaded.model.training
    with pytest.raises(CheckpointError, match="--bert-path"):
        load_model(path)


def test_coco_options_carry_over(tiny_bert: Path) -> None:
    cfg, _ = hrem.convert({"model": upstream_states(source_model(tiny_bert)),
                           "opt": hrem_opt(dataset="coco", mask_weight=1.5)})
    assert (cfg.triplet_cutoff, cfg.mask_weight, cfg.warmup_iterations) == (1.9, 1.5, 8000)


def test_detection_keeps_hrem_and_vse_infinity_apart(tiny_bert: Path) -> None:
    ckpt = {"model": upstream_states(source_model(tiny_bert)), "opt": hrem_opt()}
    assert hrem.detect(ckpt) and not vse_infinity.detect(ckpt)


@pytest.mark.parametrize("change,match", [
    ("drop aggr", "missing keys ['img_enc.aggr.layers.0.norm2.bias']"),
    ("extra graph key", "unexpected keys ['txt_enc.gnn.layers.0.linear1.bias']"),
    ("opt without nhead", "opt lacks nhead"),
])
def test_mismatches_are_one_clear_line(tmp_path: Path, tiny_bert: Path, change: str, match: str) -> None:
    image, text = upstream_states(source_model(tiny_bert))
    opt = hrem_opt()
    if change == "drop aggr":
        del image["aggr.layers.0.norm2.bias"]
    if change == "extra graph key":
        text["gnn.layers.0.linear1.bias"] = torch.zeros(16)
    if change == "opt without nhead":
        del opt.nhead
    path = write_official(tmp_path / "model_best.pth", [image, text], opt)
    with pytest.raises(CheckpointError, match=match.replace("[", r"\[").replace("]", r"\]")) as info:
        load_model(path, bert_path=str(tiny_bert))
    assert "\n" not in str(info.value)
