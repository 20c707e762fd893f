"""Data-parallel Co-GRPO on 2 CPU processes (gloo, loopback only): after each update both ranks
have the same MDM and schedule weights although they drew different prompts.

Each case runs ``tests/ddp_script.py`` in a subprocess, so pytest itself is never forked, and
compares the state dicts that the two ranks saved.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "ddp_script.py"
TIMEOUT_S = 240

pytestmark = pytest.mark.slow


def run_two_ranks(out_dir: Path, *args: str) -> dict[str, Any]:
    """Run the script on 2 ranks and return each rank's saved record plus the initial weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "RANK"):
        env.pop(name, None)
    env["MASTER_ADDR"] = "127.0.0.1"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out_dir), *args],
        cwd=out_dir.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    output = f"exit code {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-6000:]}"
    return {
        "returncode": result.returncode,
        "output": output,
        "ranks": [
            torch.load(out_dir / f"rank{rank}.pt", weights_only=True) if (out_dir / f"rank{rank}.pt").is_file() else None
            for rank in (0, 1)
        ],
        "initial": torch.load(out_dir / "initial.pt", weights_only=True) if (out_dir / "initial.pt").is_file() else None,
    }


def differing(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], prefix: str) -> list[str]:
    return [name for name in first if name.startswith(prefix) and not torch.equal(first[name], second[name])]


def unchanged(run: dict[str, Any], prefix: str) -> list[str]:
    final, initial = run["ranks"][0]["state"], run["initial"]
    return [name for name in final if name.startswith(prefix) and torch.equal(final[name], initial[name])]


@pytest.fixture(scope="module")
def joint_ddp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out_dir = tmp_path_factory.mktemp("ddp") / "joint"
    return run_two_ranks(out_dir, "--mode", "joint", "--strategy", "ddp")


@pytest.fixture(scope="module")
def alternating_ddp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # 3 updates (model, schedule, model), replaying 2 of the 4 steps: each rank draws its own 2
    out_dir = tmp_path_factory.mktemp("ddp") / "alternating"
    return run_two_ranks(
        out_dir, "--mode", "alternating", "--strategy", "ddp", "--num-updates", "3", "--train-steps-per-rollout", "2"
    )


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out_dir = tmp_path_factory.mktemp("fsdp2") / "joint"
    return run_two_ranks(out_dir, "--mode", "joint", "--strategy", "fsdp2")


def assert_ranks_identical(run: dict[str, Any]) -> None:
    assert run["returncode"] == 0, run["output"]
    first, second = run["ranks"][0], run["ranks"][1]

    assert first["prompts"] != second["prompts"], "both ranks trained on the same prompts"
    assert differing(first["state"], second["state"], "mdm.") == []
    assert differing(first["state"], second["state"], "policy.") == []


def test_ddp_joint_ranks_identical(joint_ddp: dict[str, Any]) -> None:
    assert_ranks_identical(joint_ddp)
    assert joint_ddp["ranks"][0]["num_updates"] == 1


def test_ddp_joint_updates_both_policies(joint_ddp: dict[str, Any]) -> None:
    assert joint_ddp["returncode"] == 0, joint_ddp["output"]

    assert unchanged(joint_ddp, "mdm.") == []
    assert unchanged(joint_ddp, "policy.") == []


def test_ddp_alternating_ranks_identical(alternating_ddp: dict[str, Any]) -> None:
    assert_ranks_identical(alternating_ddp)
    assert alternating_ddp["ranks"][0]["num_updates"] == 3


def test_ddp_alternating_touches_one_policy_per_step(alternating_ddp: dict[str, Any]) -> None:
    # DDP with find_unused_parameters must leave the idle policy's gradients unset, or AdamW's
    # momentum would keep moving it during the other policy's phase.
    assert alternating_ddp["returncode"] == 0, alternating_ddp["output"]
    expected = [
        {"model": True, "schedule": False},
        {"model": False, "schedule": True},
        {"model": True, "schedule": False},
    ]

    for rank in (0, 1):
        assert alternating_ddp["ranks"][rank]["step_changes"] == expected, f"rank {rank}"


def test_ddp_without_unused_detection_fails_clearly(tmp_path: Path) -> None:
    # model_only never updates the schedule policy, so DDP needs find_unused_parameters=True
    run = run_two_ranks(tmp_path / "static", "--mode", "model_only", "--strategy", "ddp_static")

    assert run["returncode"] != 0, run["output"]
    assert "ddp_find_unused_parameters_true" in run["output"]


def test_fsdp2_model_shards_identical(fsdp2_run: dict[str, Any]) -> None:
    assert fsdp2_run["returncode"] == 0, fsdp2_run["output"]
    first, second = fsdp2_run["ranks"][0], fsdp2_run["ranks"][1]

    assert first["prompts"] != second["prompts"]
    assert differing(first["state"], second["state"], "mdm.") == []
    assert unchanged(fsdp2_run, "mdm.") == []


def test_fsdp2_schedule_identical(fsdp2_run: dict[str, Any]) -> None:
    assert fsdp2_run["returncode"] == 0, fsdp2_run["output"]
    first, second = fsdp2_run["ranks"][0], fsdp2_run["ranks"][1]

    assert differing(first["state"], second["state"], "policy.") == []


