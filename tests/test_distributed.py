"""Distributed training under torchrun: the global-batch loss and gradients, rank-0-only writes, resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from itmatch.distributed import gather_with_grad, shard

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.parametrize("n", [0, 1, 7, 15, 16])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_concatenate_to_the_global_batch(n: int, world: int) -> None:
    batch = list(range(100, 100 + n))
    parts = [shard(batch, r, world) for r in range(world)]
    assert sum(parts, []) == batch
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_gather_is_the_identity_in_one_process() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x


def torchrun(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a crashing rank prints its stack
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-12000:]
    return proc


@pytest.mark.slow
def test_two_processes_give_the_loss_and_gradients_of_one_process_on_the_global_batch(
        tiny_data: Path, tmp_path: Path) -> None:
    """Hardest negatives are mined over the concatenated batch (a per-rank loss would differ)."""
    from itmatch.data.precomp import CaptionDataset
    from itmatch.training import build_model, build_recipe, resolve_config
    from tests.ddp_worker import tiny_config

    torchrun("grads", str(tiny_data), str(tmp_path / "ddp.pt"))
    ddp = torch.load(tmp_path / "ddp.pt")
    cfg, split, tokenizer = resolve_config(tiny_config(str(tiny_data)))
    assert cfg.train.max_violation
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = CaptionDataset(split, tokenizer).batch(ddp["batch"])
    loss = build_recipe(model, cfg).loss(batch.images, batch.captions, batch.lengths, epoch=0)["loss"]
    loss.backward()
    torch.testing.assert_close(ddp["loss"], loss.detach(), rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ddp["grads"].keys()
    for name, grad in grads.items():
        torch.testing.assert_close(ddp["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_torchrun_training_writes_from_rank_0_only_and_resumes(tiny_data: Path, tmp_path: Path) -> None:
    """A 2-process run crashes mid-epoch, resumes under torchrun, and ends where one process ends."""
    from itmatch.checkpoints import native
    from itmatch.training import BEST, CHECKPOINT, fit
    from tests.ddp_worker import tiny_config

    run, log = tmp_path / "run", tmp_path / "writes.log"
    crashed = torchrun("fit", str(tiny_data), str(run), str(log), "--crash-at", "18", check=False)
    assert crashed.returncode != 0
    assert native.load(run / CHECKPOINT)["state"]["global_step"] == 16  # save_every=4: the last save before 18
    torchrun("fit", str(tiny_data), str(run), str(log), "--resume")
    writes = log.read_text().split("\n")[:-1]
    assert writes and {w.split()[0] for w in writes} == {"0"}, writes
    assert {w.split()[1] for w in writes} == {CHECKPOINT, BEST}
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 2  # rank 0's, one per session

    ref = fit(tiny_config(str(tiny_data)), tmp_path / "ref")
    got = native.load(run / CHECKPOINT)
    assert got["state"]["global_step"] == ref["steps"] == 2 * 14
    expected = native.load(tmp_path / "ref" / CHECKPOINT)["model"]
    for name, value in expected.items():
        torch.testing.assert_close(got["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_every_method_trains_under_torchrun(tiny_bert: Path) -> None:
    from tests.conftest import training_recipe
    from tests.test_models import tiny_model

    names = ("vsepp", "vse_infinity", "vsrn", "hrem", "scan", "gsmn")
    models = [tiny_model(name, str(tiny_bert)) for name in names]
    assert [m.is_embedding_model() for m in models] == [True] * 4 + [False] * 2
    assert all(training_recipe(m).trains_distributed for m in models)


@pytest.mark.slow
def test_cross_attention_methods_split_the_pairs_and_equal_one_process(tiny_bert: Path, tmp_path: Path) -> None:
    """SCAN, GSMN (pairs scored by cross attention) and HREM (batch relation graph): with 2 ranks, each scores only
    its images against all captions (each pair once), and the loss and every gradient (the HREM graph's included)
    equal one process on the concatenated batch of 7 (shards of 4 + 3, captions padded per rank)."""
    from tests.ddp_worker import PAIR_IDS, pair_setup

    names = ("scan", "gsmn", "hrem")
    torchrun("pairs", str(tiny_bert), str(tmp_path / "ddp.pt"), *names)
    ranks = [torch.load(tmp_path / f"ddp.pt.{r}") for r in range(2)]
    b = len(PAIR_IDS)
    for name in names:
        ddp = ranks[0][name]
        if name != "hrem":
            assert ranks[0][name]["scored"] == [(4, b)], ranks[0][name]["scored"]
            assert ranks[1][name]["scored"] == [(3, b)], ranks[1][name]["scored"]
            assert ranks[1][name]["loss"] == ddp["loss"]  # every rank reports the global loss
        model, recipe, (images, captions, lengths, extras) = pair_setup(name, str(tiny_bert))
        loss = recipe.loss(images, captions, lengths, epoch=0, **extras)["loss"]
        loss.backward()
        torch.testing.assert_close(ddp["loss"], loss.detach(), rtol=1e-5, atol=1e-5, msg=name)
        modules = {"model": model, **recipe.modules()}
        grads = {f"{m}.{n}": p.grad for m, module in modules.items()
                 for n, p in module.named_parameters() if p.grad is not None}
        assert grads.keys() == ddp["grads"].keys(), name
        assert any(n.startswith("graph.") for n in grads) == (name == "hrem")
        for key, grad in grads.items():
            torch.testing.assert_close(ddp["grads"][key], grad, rtol=1e-5, atol=1e-5, msg=f"{name} {key}")


@pytest.mark.slow
def test_scan_under_torchrun_resumes_to_the_weights_of_one_process(tiny_data: Path, tmp_path: Path) -> None:
    """A 2-process SCAN run crashes mid-epoch, resumes under torchrun, and ends where one process ends."""
    from itmatch.checkpoints import native
    from itmatch.training import CHECKPOINT, fit
    from tests.ddp_worker import tiny_config

    run, log = tmp_path / "run", tmp_path / "writes.log"
    preset = ("--preset", "scan_synth_t2i_avg", "--epochs", "1")
    crashed = torchrun("fit", str(tiny_data), str(run), str(log), "--crash-at", "6", *preset, check=False)
    assert crashed.returncode != 0
    assert native.load(run / CHECKPOINT)["state"]["global_step"] == 4
    torchrun("fit", str(tiny_data), str(run), str(log), "--resume", *preset)
    ref = fit(tiny_config(str(tiny_data), "train.epochs=1", preset="scan_synth_t2i_avg"), tmp_path / "ref")
    got = native.load(run / CHECKPOINT)
    assert got["state"]["global_step"] == ref["steps"] == 14
    expected = native.load(tmp_path / "ref" / CHECKPOINT)["model"]
    for name, value in expected.items():
        torch.testing.assert_close(got["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_autocast_trains_and_fp16_needs_a_gpu(tiny_data: Path, tmp_path: Path) -> None:
    from itmatch.errors import ConfigError
    from itmatch.training import fit
    from tests.ddp_worker import tiny_config

    summary = fit(tiny_config(str(tiny_data), "train.amp=\"bf16\"", "train.max_steps=3"), tmp_path / "bf16")
    assert summary["steps"] == 3
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        fit(tiny_config(str(tiny_data), "train.amp=\"fp16\""), tmp_path / "fp16")
