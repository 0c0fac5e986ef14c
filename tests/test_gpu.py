"""The CUDA paths, run on a GPU (`pytest -m gpu`; skipped, with the reason, where CUDA is not available).

Every method's similarity on CUDA in float32 against the CPU float64 result, bfloat16 and TF32 against it with the
recalls unchanged, one training step of every method under `train.amp` bf16 and fp16 (loss scaling) against
float32, and `torchrun` with NCCL training and resuming. Models are the pinned presets of tests/test_pins.py,
trained for two epochs of 5 steps on the CPU first (the same weights on both devices).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_pins import PRESETS, _preset

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (an NVIDIA GPU); none here")]

DEVICE = "cuda"
FLOAT32_TOL = 1e-5  # CUDA float32 vs CPU float64, absolute, on cosine-scale scores
LOW_PRECISION_TOL = {"bfloat16": 3e-2, "tf32": 5e-3}  # bfloat16 keeps 8 bits of mantissa, TF32 10
AMP_LOSS_RTOL = {"bf16": 3e-2, "fp16": 5e-3}  # first-step loss under autocast vs float32


@pytest.fixture(scope="module")
def trained(pin_data: Path, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each pinned preset trained on the CPU (2 epochs of 5 steps): name -> best checkpoint."""
    from itmatch.training import BEST, fit

    root = tmp_path_factory.mktemp("gpu_runs")
    out = {}
    for name in sorted(PRESETS):
        fit(_preset(name, pin_data, tiny_bert), root / name)
        out[name] = root / name / BEST
    return out


def _sims(checkpoint: Path, device: str, dtype: torch.dtype) -> np.ndarray:
    from itmatch.checkpoints.loader import load_model
    from itmatch.inference import compute_sims
    from itmatch.training import open_split

    loaded = load_model(checkpoint)
    model = loaded.model.to(device)
    split = open_split(loaded.config, Path(loaded.config.data.path), "test")
    return compute_sims(model, split, loaded.vocab, device=device, dtype=dtype)


def _recalls(sims: np.ndarray) -> dict:
    from itmatch.evaluation import evaluate_sims

    res = evaluate_sims(sims)
    return {d: {k: res[d][k] for k in ("R@1", "R@5", "R@10")} for d in ("i2t", "t2i")}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_cuda_float32_similarity_equals_cpu_float64(name: str, trained: dict[str, Path]) -> None:
    cpu = _sims(trained[name], "cpu", torch.float64)
    gpu = _sims(trained[name], "cuda", torch.float32)
    assert gpu.shape == cpu.shape and np.isfinite(gpu).all()
    assert np.abs(gpu - cpu).max() <= FLOAT32_TOL, f"{name}: max |delta| {np.abs(gpu - cpu).max():.2e}"


@pytest.mark.parametrize("mode", ["bfloat16", "tf32"])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_bfloat16_and_tf32_stay_within_tolerance_and_keep_the_recalls(name: str, mode: str,
                                                                        trained: dict[str, Path]) -> None:
    cpu = _sims(trained[name], "cpu", torch.float64)
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        if mode == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        gpu = _sims(trained[name], "cuda", torch.bfloat16 if mode == "bfloat16" else torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous
    delta = float(np.abs(gpu - cpu).max())
    assert delta <= LOW_PRECISION_TOL[mode], f"{name} {mode}: max |delta| {delta:.2e}"
    assert _recalls(gpu) == _recalls(cpu), f"{name} {mode}: recalls moved"


def _first_step(name: str, data: Path, bert: Path, out: Path, amp: str) -> tuple[float, dict]:
    from dataclasses import replace

    from itmatch.training import fit

    cfg = _preset(name, data, bert)
    cfg = replace(cfg, train=replace(cfg.train, device=DEVICE, amp=amp, max_steps=1))
    losses: list[float] = []
    fit(cfg, out, on_step=lambda state, stats: losses.append(float(stats["loss"])))
    assert len(losses) == 1, "one training step ran"
    from itmatch.checkpoints import native
    from itmatch.training import CHECKPOINT

    return losses[0], native.load(out / CHECKPOINT)["model"]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_one_mixed_precision_step_is_finite_and_close_to_float32(name: str, amp: str, pin_data: Path,
                                                                  tiny_bert: Path, tmp_path: Path) -> None:
    ref_loss, ref = _first_step(name, pin_data, tiny_bert, tmp_path / "f32", "")
    loss, weights = _first_step(name, pin_data, tiny_bert, tmp_path / amp, amp)
    assert np.isfinite(loss) and all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    assert loss == pytest.approx(ref_loss, rel=AMP_LOSS_RTOL[amp]), f"{name} {amp}: loss {loss} vs {ref_loss}"
    moved = [k for k in ref if ref[k].is_floating_point() and not torch.equal(ref[k], weights[k])]
    assert moved, "the step changed the weights under autocast too (float32 and mixed runs differ somewhere)"


def test_torchrun_with_nccl_trains_crashes_and_resumes(pin_data: Path, tmp_path: Path) -> None:
    """One process under torchrun on the GPU (NCCL): a run crashes at step 6, resumes from its step-4 checkpoint
    and ends with the dev history of an uninterrupted run."""
    worker = Path(__file__).parent / "ddp_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}

    def torchrun(run: Path, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(worker),
               "fit", str(pin_data), str(run), str(tmp_path / "log.txt"), "--device", "cuda", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)

    whole = torchrun(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-8000:]
    crashed = torchrun(tmp_path / "run", "--crash-at", "6")
    assert crashed.returncode != 0, "the run crashed"
    from itmatch.checkpoints import native
    from itmatch.training import CHECKPOINT

    saved = native.load(tmp_path / "run" / CHECKPOINT)
    assert saved["state"]["global_step"] == 4 and saved["config"]["train"]["device"] == "cuda"
    resumed = torchrun(tmp_path / "run", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-8000:]
    a, b = (native.load(tmp_path / d / CHECKPOINT) for d in ("whole", "run"))
    assert b["state"]["global_step"] == a["state"]["global_step"] > 6
    rsums = [[h["rsum"] for h in c["history"] if "rsum" in h] for c in (a, b)]
    assert rsums[0] and rsums[1] == pytest.approx(rsums[0], abs=1e-6)
