"""Thread settings that degrade gracefully on shared cores: passive OpenMP waits set before torch loads, and the
CLI's torch threads from the CPUs this process may actually use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _policy_after_import(env_policy: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"PYTHONPATH": SRC}
    if env_policy is not None:
        env["OMP_WAIT_POLICY"] = env_policy
    code = "import os, itmatch, torch; print(os.environ['OMP_WAIT_POLICY'])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_importing_itmatch_sets_passive_waits_unless_the_environment_chose() -> None:
    assert _policy_after_import(None) == "PASSIVE"
    assert _policy_after_import("ACTIVE") == "ACTIVE"


def test_the_cli_uses_as_many_threads_as_cpus_it_may_run_on(monkeypatch) -> None:
    import torch

    from itmatch import cli

    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no sched_getaffinity on this platform")
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
        cli._share_cores_gracefully()
        assert torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(2)
        cli._share_cores_gracefully()
        assert torch.get_num_threads() == 2, "an explicit OMP_NUM_THREADS wins"
    finally:
        torch.set_num_threads(before)
