"""A method defined in ONE file outside the package (plus its preset) goes through every entry point: train, eval
(incl. an ensemble with a built-in method), index build, search --rerank and the serve API, with no edit anywhere in
src/itmatch. Both plugin mechanisms: `--plugin FILE.py` and the entry-point group `itmatch.methods`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import itmatch
from itmatch.cli import main

TOY_EMBED = '''
"""Toy embedding method: mean-pooled regions and mean-pooled word vectors, dot product."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

import itmatch


@dataclass(frozen=True, slots=True)
class ToyEmbedConfig:
    name: Literal["toy_embed"] = "toy_embed"
    image_dim: int = 0
    vocab_size: int = 0
    embed_dim: int = 32


class ToyEmbed(itmatch.RetrievalModel):
    def __init__(self, cfg, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        self.image = nn.Linear(cfg.image_dim, cfg.embed_dim, device=device, dtype=dtype)
        self.words = nn.Embedding(cfg.vocab_size, cfg.embed_dim, device=device, dtype=dtype)

    def encode_image(self, images):
        pooled = images.mean(dim=1) if images.ndim == 3 else images
        return itmatch.Encoded(F.normalize(self.image(pooled), dim=-1))

    def encode_text(self, captions, lengths):
        steps = torch.arange(captions.shape[1], device=captions.device)
        mask = (steps[None] < lengths.to(captions.device)[:, None]).float()
        mean = (self.words(captions) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return itmatch.Encoded(F.normalize(mean, dim=-1))


def build(cfg, *, device=None, dtype=None):
    return ToyEmbed(cfg, device=device, dtype=dtype)


SPEC = itmatch.register_method(itmatch.MethodSpec(
    name="toy_embed", config=ToyEmbedConfig, build=build,
    presets={"toy_embed_synth": {"model": {"name": "toy_embed"}, "data": {"batch_size": 50},
                                 "train": {"epochs": 2, "lr": 0.01, "max_violation": False}}},
))
'''

TOY_XATTN = '''
"""Toy cross-attention method: each word attends to its best region (max of dot products), averaged over words."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

import itmatch


@dataclass(frozen=True, slots=True)
class ToyXattnConfig:
    name: Literal["toy_xattn"] = "toy_xattn"
    image_dim: int = 0
    vocab_size: int = 0
    embed_dim: int = 16


class ToyXattn(itmatch.RetrievalModel):
    def __init__(self, cfg, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        self.image = nn.Linear(cfg.image_dim, cfg.embed_dim, device=device, dtype=dtype)
        self.words = nn.Embedding(cfg.vocab_size, cfg.embed_dim, device=device, dtype=dtype)

    def encode_image(self, images):
        return itmatch.Encoded(F.normalize(self.image(images), dim=-1))  # (N, R, D)

    def encode_text(self, captions, lengths):
        return itmatch.Encoded(F.normalize(self.words(captions), dim=-1), lengths)  # (N, L, D) + lengths

    def similarity(self, images, texts):
        texts = texts.padded()  # evaluation packs caption galleries
        words = texts.emb.to(images.emb.dtype)
        best = torch.einsum("ird,jld->ijrl", images.emb, words).amax(dim=2)  # (Ni, Nj, L)
        lengths = texts.lengths.to(best.device)
        mask = (torch.arange(words.shape[1], device=best.device)[None] < lengths[:, None]).to(best.dtype)
        return (best * mask[None]).sum(-1) / lengths[None].to(best.dtype)


def build(cfg, *, device=None, dtype=None):
    return ToyXattn(cfg, device=device, dtype=dtype)


SPEC = itmatch.register_method(itmatch.MethodSpec(
    name="toy_xattn", config=ToyXattnConfig, build=build,
    presets={"toy_xattn_synth": {"model": {"name": "toy_xattn"}, "data": {"batch_size": 50},
                                 "train": {"epochs": 1, "lr": 0.01, "max_violation": False}}},
))
'''


@pytest.fixture(scope="module")
def plugin_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two one-file plugins and a built-in model, trained on a small synthetic dataset through the CLI."""
    from itmatch.data.synthetic import generate

    root = tmp_path_factory.mktemp("plugins")
    data = root / "synth"
    generate(data, variant="f30k", seed=1, dim=16, sizes={"train": 100, "dev": 20, "test": 20})
    assert main(["-q", "data", "vocab", str(data)]) == 0
    files = {"embed": root / "toy_embed.py", "xattn": root / "toy_xattn.py"}
    files["embed"].write_text(TOY_EMBED, encoding="utf-8")
    files["xattn"].write_text(TOY_XATTN, encoding="utf-8")
    runs = {"data": data, **{f"{k}_file": v for k, v in files.items()}}
    for name, preset, extra in (("embed", "toy_embed_synth", []), ("xattn", "toy_xattn_synth", []),
                                ("vsepp", "vsepp_synth", ["--set", "model.embed_dim=16", "--set", "model.word_dim=8",
                                                          "--set", "train.epochs=1", "--set", "data.batch_size=50"])):
        plugins = [] if name == "vsepp" else ["--plugin", str(files[name])]
        out = root / name
        assert main(["-q", *plugins, "train", "--preset", preset, "--data", str(data), "--out", str(out),
                     *extra]) == 0
        assert (out / "model_best.pt").is_file()
        runs[name] = out / "model_best.pt"
    return runs


def test_plugins_train_and_evaluate_alone_and_in_an_ensemble_with_a_built_in(plugin_runs: dict, tmp_path: Path,
                                                                              capsys) -> None:
    data, plugins = plugin_runs["data"], ["--plugin", str(plugin_runs["embed_file"]),
                                          "--plugin", str(plugin_runs["xattn_file"])]
    assert {"toy_embed", "toy_xattn"} <= set(itmatch.list_models())  # registered by the files, not the package
    assert not (Path(itmatch.__file__).parent / "models" / "toy_embed.py").exists()
    singles = {}
    for name in ("embed", "xattn", "vsepp"):
        singles[name] = itmatch.evaluate(plugin_runs[name], data).sims
        assert singles[name].shape == (20, 100) and np.isfinite(singles[name]).all()
    out = tmp_path / "ens.npz"
    capsys.readouterr()
    code = main(["-q", *plugins, "eval", str(plugin_runs["embed"]), str(plugin_runs["xattn"]),
                 str(plugin_runs["vsepp"]), "--data", str(data), "--save-sims", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "3 model(s)" in capsys.readouterr().out
    saved = np.load(out)
    np.testing.assert_allclose(saved["sims"], (singles["embed"] + singles["xattn"] + singles["vsepp"]) / 3,
                               rtol=1e-12, atol=1e-12)
    assert [m.split(":")[0] for m in saved["models"]] == ["toy_embed", "toy_xattn", "vsepp"]
    assert list(saved["caption_ids"]) == list(range(100)) and len(saved["image_ids"]) == 20


def test_plugins_index_search_rerank_and_serve(plugin_runs: dict, tmp_path: Path, capsys) -> None:
    data, embed, xattn = plugin_runs["data"], plugin_runs["embed"], plugin_runs["xattn"]
    plugins = ["--plugin", str(plugin_runs["embed_file"]), "--plugin", str(plugin_runs["xattn_file"])]
    index = tmp_path / "index"
    assert main(["-q", *plugins, "index", "build", str(embed), "--data", str(data), "--out", str(index)]) == 0
    # the cross-attention plugin cannot be indexed: the generic refusal, naming re-ranking
    assert main(["-q", *plugins, "index", "build", str(xattn), "--data", str(data), "--out",
                 str(tmp_path / "no")]) == 2
    assert "--rerank" in capsys.readouterr().err
    query = itmatch.open_dataset(data, "test").captions[7]
    capsys.readouterr()
    assert main(["-q", *plugins, "search", str(index), "--text", query, "--rerank", str(xattn),
                 "--candidates", "20", "-k", "5", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["hits"]
    assert len(hits) == 5
    # re-ranked scores are the plugin's own similarity, computed independently through the Python API
    matcher = itmatch.load(xattn)
    dataset = itmatch.open_dataset(data, "test")
    sims = matcher.similarity(matcher.encode_images(dataset.features.images[np.arange(20)]),
                              matcher.encode_texts([query]))[:, 0]
    ids = dataset.image_ids
    for hit in hits:
        assert hit["score"] == pytest.approx(sims[ids.index(hit["id"])], abs=1e-6)
    assert [h["score"] for h in hits] == pytest.approx(sorted(sims, reverse=True)[:5], abs=1e-6)

    from fastapi.testclient import TestClient

    from itmatch.serve import RetrievalService, create_app

    service = RetrievalService.open([index], rerank=xattn, candidates=20)
    with TestClient(create_app(service)) as client:
        answer = client.get("/api/search/text", params={"q": query, "k": 3})
        assert answer.status_code == 200, answer.text
        # the page's JSON rounds scores to 6 decimals: up to 5e-7 from the CLI's
        assert [h["score"] for h in answer.json()["hits"]] == pytest.approx([h["score"] for h in hits[:3]],
                                                                             rel=0, abs=5.01e-7)
        assert client.get("/api/info").json()["attention"] is False  # the toy method offers no attention maps
        assert client.get("/api/attention", params={"id": ids[0], "q": query}).status_code == 400
    service.close()


def test_entry_point_plugins_register_without_any_flag(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "toy_embed_plugin.py").write_text(TOY_EMBED, encoding="utf-8")
    info = site / "toy_embed_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-embed-plugin\nVersion: 0.1\n", encoding="utf-8")
    (info / "entry_points.txt").write_text("[itmatch.methods]\ntoy_embed = toy_embed_plugin:SPEC\n", encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), *sys.path]))
    script = textwrap.dedent("""
        import itmatch
        print(",".join(itmatch.list_models()))
        print("toy_embed_synth" in itmatch.list_presets())
    """)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    models, has_preset = done.stdout.split()
    assert "toy_embed" in models.split(",") and has_preset == "True"
    done = subprocess.run([sys.executable, "-c", "import itmatch; print(itmatch.list_models())"],
                          env=dict(os.environ), capture_output=True, text=True, check=True)
    assert "toy_embed" not in done.stdout  # without the distribution, no such method


def test_a_broken_plugin_file_is_one_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n", encoding="utf-8")
    assert main(["--plugin", str(bad), "presets"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.py failed to load: RuntimeError: boom" in err
    assert main(["--plugin", str(tmp_path / "missing.py"), "presets"]) == 2
    assert "plugin not found" in capsys.readouterr().err
