"""GSMN's released checkpoints: a file in the original key layout (four state dicts, pickled argparse options)
loads strictly, with the vocabulary size from its embedding, and scores like the model it came from."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from itmatch.checkpoints.loader import PretokenizedOnly, load_model
from itmatch.cli import main
from itmatch.models import gsmn as gsmn_ckpt
from tests.test_gsmn import random_inputs, tiny_model


def official_layout(model: torch.nn.Module, sparse: bool) -> dict:
    """What the original's `torch.save` writes: legacy names (graph_convolution_*, weight_g/weight_v)."""
    sd = model.state_dict()

    def part(prefix: str, conv: str | None = None) -> dict:
        out = {}
        for k, v in sd.items():
            if k.startswith(prefix):
                key = k.removeprefix(prefix)
                if conv:
                    key = key.replace("conv.", f"{conv}.", 1).removeprefix("head.")
                out[key] = v.clone()
        return out

    opt = argparse.Namespace(data_name="f30k_precomp", embed_size=model.cfg.embed_dim, num_block=16, feat_dim=16,
                             hid_dim=32, out_dim=1, lambda_softmax=model.cfg.lambda_softmax, is_sparse=sparse,
                             bi_gru=True, batch_size=64, vocab_path="/home/authors/vocab", num_layers=1)
    return {"epoch": 12, "model": [part("img_enc."), part("txt_enc."), part("i2t_graph.", "graph_convolution_1"),
                                   part("t2i_graph.", "graph_convolution_3")],
            "best_rsum": 480.0, "opt": opt, "Eiters": 1000}


def test_original_layout_loads_strictly_and_scores_identically(tmp_path: Path) -> None:
    for sparse in (False, True):
        model = tiny_model(sparse)
        ckpt = official_layout(model, sparse)
        assert "out_1.weight_g" in ckpt["model"][2] and "graph_convolution_3.conv_weights.0.bias" in ckpt["model"][3]
        assert gsmn_ckpt.detect(ckpt)
        path = tmp_path / f"model_best_{sparse}.pth.tar"
        torch.save(ckpt, path)
        loaded = load_model(path)
        assert loaded.config.model.sparse is sparse and loaded.config.model.vocab_size == 30
        assert loaded.config.model.text_ids == "precaps_stan" and isinstance(loaded.vocab, PretokenizedOnly)
        images, boxes, captions, lengths, depends = random_inputs(4, 5)
        with torch.no_grad():
            want = model.similarity(model.encode_image(images, boxes), model.encode_text(captions, lengths, depends))
            got = loaded.model.similarity(loaded.model.encode_image(images, boxes),
                                          loaded.model.encode_text(captions, lengths, depends))
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _gsmn_split(root: Path, n_img: int, seed: int = 0) -> None:
    """A test split in the GSMN layout, for the tiny model (24-d features, 7 regions, ids < 30)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "test_ims.npy", rng.random((n_img, 7, 24), dtype=np.float32))
    (root / "test_caps.txt").write_text("a caption\n" * (5 * n_img), encoding="utf-8")
    xy = rng.random((n_img, 7, 2)) * 300
    np.save(root / "test_ims_bbx.npy", np.concatenate([xy, xy + 50], -1).astype(np.float32))
    sizes = np.empty(n_img, dtype=object)
    for i in range(n_img):
        sizes[i] = {"image_w": 400, "image_h": 380}
    np.save(root / "test_ims_size.npy", sizes, allow_pickle=True)
    lines, deps = [], []
    for _ in range(5 * n_img):
        n = int(rng.integers(3, 9))
        lines.append(",".join(str(int(t)) for t in rng.integers(4, 30, n)))
        deps.append([[0, 1]] + [[int(rng.integers(1, n)), int(rng.integers(1, n))] for _ in range(n)])
    (root / "test_precaps_stan.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    import json

    (root / "test_caps.json").write_text(json.dumps(deps), encoding="utf-8")


def test_eval_cli_box_compat_and_dense_sparse_ensemble(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    _gsmn_split(data, 4)
    paths = []
    for sparse in (False, True):
        path = tmp_path / f"{'sparse' if sparse else 'dense'}.pth.tar"
        torch.save(official_layout(tiny_model(sparse, seed=int(sparse)), sparse), path)
        paths.append(str(path))
    outs = {}
    for extra in ([], ["--box-compat", "--box-compat-batch", "8"]):
        out = tmp_path / f"res{len(extra)}.json"
        assert main(["-q", "eval", *paths, "--data", str(data), "--out", str(out), *extra]) == 0
        outs[len(extra)] = out.read_text()
    assert "2 model(s)" in capsys.readouterr().out
    assert outs[0] != outs[3]  # the compat geometry changes the scores


def test_model_inputs_box_compat_variants_replay_the_original_loader(tmp_path: Path) -> None:
    from itmatch.data.precomp import PrecompSplit
    from itmatch.errors import DataError
    from itmatch.models.gsmn import GsmnInputs
    from tests.test_gsmn import _simulate_original_loader

    data = tmp_path / "data"
    _gsmn_split(data, 4)  # images 400 wide, 380 high: the two variants differ
    split = PrecompSplit(data, "test")
    raw = np.load(data / "test_ims_bbx.npy")
    sizes = [{"image_w": 400, "image_h": 380}] * 4
    cfg = tiny_model(False).cfg
    for variant, swap in (("release", True), (True, True), ("upstream", False)):  # True: the old boolean API
        rows = _simulate_original_loader(raw, sizes, 20, 8, swap_wh=swap)
        got = GsmnInputs(cfg).for_split(split, options={"box_compat": variant, "box_compat_batch": 8}).images["boxes"]
        np.testing.assert_array_equal(got, np.stack(rows[:4]).astype(np.float32))
    release = GsmnInputs(cfg).for_split(split, options={"box_compat": "release", "box_compat_batch": 8}).images["boxes"]
    assert not np.array_equal(release, GsmnInputs(cfg).for_split(
        split, options={"box_compat": "upstream", "box_compat_batch": 8}).images["boxes"])
    with pytest.raises(DataError, match="box-compat variant 'fixed'"):
        GsmnInputs(cfg).for_split(split, options={"box_compat": "fixed"})


def test_eval_box_compat_flag_and_its_batch_from_the_checkpoint(tmp_path: Path, monkeypatch) -> None:
    import itmatch.inference

    data = tmp_path / "data"
    _gsmn_split(data, 5)
    calls: list[tuple] = []

    def spy(model, split, vocab, **kw):  # what the CLI asks the scorer for; scores are not the point here
        options = kw["options"]
        calls.append((options.get("box_compat", ""), options.get("box_compat_batch")))
        return np.eye(5).repeat(5, axis=1)

    monkeypatch.setattr(itmatch.inference, "compute_sims", spy)
    model = tiny_model(False)
    recorded = official_layout(model, False)
    recorded["opt"].batch_size = 8
    unrecorded = official_layout(model, False)
    del unrecorded["opt"].batch_size
    paths = {}
    for name, ckpt in (("recorded", recorded), ("unrecorded", unrecorded)):
        paths[name] = tmp_path / f"{name}.pth.tar"
        torch.save(ckpt, paths[name])
    runs = [
        (["recorded", "--box-compat"], ("release", 8)),  # bare flag = the release's code, batch from opt
        (["recorded", "--box-compat", "upstream"], ("upstream", 8)),
        (["recorded", "--box-compat", "release", "--box-compat-batch", "32"], ("release", 32)),
        (["unrecorded", "--box-compat"], ("release", 64)),  # no opt.batch_size: 64
        (["recorded"], ("", None)),  # no compat geometry: no loader batch either
    ]
    for (name, *flags), want in runs:
        calls.clear()
        assert main(["-q", "eval", str(paths[name]), "--data", str(data), *flags]) == 0
        assert calls == [want], (name, flags)
    assert main(["-q", "eval", str(paths["recorded"]), "--data", str(data), "--box-compat", "swapped"]) == 2
