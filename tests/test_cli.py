"""The command line, run as a user runs it: ``python -m cogrpo_lightning fit --config ...`` in a
subprocess, with overrides that shrink each run to a few seconds.

The Co-GRPO runs use the checkpoint shipped in ``cogrpo_lightning/assets/tiny_mdm`` when it is
there. Without it they write a random checkpoint of the shipped architecture to a temporary
directory and pass it with ``--model.init_args.mdm``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from cogrpo_lightning.mdm.tiny import DEFAULT_CHECKPOINT, TinyMDM, TinyMDMConfig

REPO = Path(__file__).resolve().parent.parent
COGRPO_CONFIG = REPO / "configs" / "shapes" / "cogrpo.yaml"
PRETRAIN_CONFIG = REPO / "configs" / "shapes" / "pretrain.yaml"
TIMEOUT_S = 300

pytestmark = pytest.mark.slow


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # One OpenMP thread, because several made the tiny model about 100x slower on a shared 2-core machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "cogrpo_lightning", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def describe(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit code {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"


@pytest.fixture(scope="module")
def mdm_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Overrides that select the MDM: none with the shipped checkpoint, else a random stand-in."""
    if (DEFAULT_CHECKPOINT / "model.safetensors").is_file():
        return []
    directory = tmp_path_factory.mktemp("tiny_mdm")
    torch.manual_seed(0)
    TinyMDM(TinyMDMConfig(hidden_size=96, num_layers=4, num_heads=4)).save_pretrained(directory)
    return [
        "--model.init_args.mdm=cogrpo_lightning.mdm.tiny.TinyMDM",
        f"--model.init_args.mdm.init_args.checkpoint_dir={directory}",
    ]


def small_cogrpo_args(save_dir: Path) -> list[str]:
    return [
        "--config", str(COGRPO_CONFIG),
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1",
        "--model.init_args.num_steps=2",
        "--model.init_args.eval_images_per_prompt=1",
        "--data.init_args.prompts_per_batch=2",
        "--data.init_args.group_size=2",
        "--data.init_args.val_prompts_per_batch=4",
        f"--trainer.logger.init_args.save_dir={save_dir}",
    ]


@pytest.fixture(scope="module")
def cogrpo_fit(tmp_path_factory: pytest.TempPathFactory, mdm_args: list[str]) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cli_fit")
    result = run_cli(["fit", *small_cogrpo_args(root / "logs"), *mdm_args], cwd=root)
    return {"result": result, "root": root}


def test_fit_exits_cleanly(cogrpo_fit: dict[str, Any]) -> None:
    result = cogrpo_fit["result"]

    assert result.returncode == 0, describe(result)


def test_fit_prints_held_out_table(cogrpo_fit: dict[str, Any]) -> None:
    output = cogrpo_fit["result"].stdout + cogrpo_fit["result"].stderr

    assert "Held-out baseline (base model, predefined schedule)" in output
    assert "| tag | images | base_T2 | trained_T2 | base_T1 | trained_T1 |" in output
    assert "| overall | 4 |" in output


def test_fit_writes_metrics_and_checkpoint(cogrpo_fit: dict[str, Any]) -> None:
    logs = cogrpo_fit["root"] / "logs"
    metrics = list(logs.rglob("metrics.csv"))
    checkpoints = list(logs.rglob("*.ckpt"))

    assert len(metrics) == 1, describe(cogrpo_fit["result"])
    header = metrics[0].read_text().splitlines()[0].split(",")
    assert {"reward/mean", "loss/model", "eval/trained_T2/overall"} <= set(header)
    assert len(checkpoints) == 1


def test_validate_reads_fit_checkpoint(cogrpo_fit: dict[str, Any], mdm_args: list[str]) -> None:
    checkpoints = list((cogrpo_fit["root"] / "logs").rglob("*.ckpt"))
    assert len(checkpoints) == 1, describe(cogrpo_fit["result"])
    root = cogrpo_fit["root"]

    result = run_cli(
        ["validate", *small_cogrpo_args(root / "validate_logs"), *mdm_args, f"--ckpt_path={checkpoints[0]}"],
        cwd=root,
    )

    assert result.returncode == 0, describe(result)
    output = result.stdout + result.stderr
    # the base-model columns come from the checkpoint, not from the trained model
    assert "base = base)" in output
    assert "| tag | images | base_T2 | trained_T2 | base_T1 | trained_T1 |" in output


def test_group_size_mismatch_rejected(tmp_path: Path, mdm_args: list[str]) -> None:
    args = [*small_cogrpo_args(tmp_path / "logs"), *mdm_args, "--model.init_args.group_size=4"]

    result = run_cli(["fit", *args], cwd=tmp_path)

    assert result.returncode != 0, describe(result)
    assert "model.group_size=4 differs from data.group_size=2" in result.stderr
    assert "remove model.group_size" in result.stderr


def test_help_lists_subcommands(tmp_path: Path) -> None:
    result = run_cli(["--help"], cwd=tmp_path)

    assert result.returncode == 0, describe(result)
    for subcommand in ("fit", "validate", "test", "predict"):
        assert subcommand in result.stdout


def test_fit_help_shows_model_options(tmp_path: Path) -> None:
    result = run_cli(["fit", "--config", str(COGRPO_CONFIG), "--model.help", "CoGRPOModule"], cwd=tmp_path)

    assert result.returncode == 0, describe(result)
    for option in ("--model.mode", "--model.group_size", "--model.kl_beta", "--model.mdm"):
        assert option in result.stdout


def test_pretrain_writes_checkpoint(tmp_path: Path) -> None:
    save_dir = tmp_path / "tiny_mdm"
    args = [
        "--config", str(PRETRAIN_CONFIG),
        "--trainer.max_steps=2",
        "--model.init_args.hidden_size=32",
        "--model.init_args.num_layers=1",
        "--model.init_args.num_heads=2",
        f"--model.init_args.save_dir={save_dir}",
        "--data.init_args.batch_size=8",
        "--data.init_args.num_workers=0",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
    ]

    result = run_cli(["fit", *args], cwd=tmp_path)

    assert result.returncode == 0, describe(result)
    assert (save_dir / "config.json").is_file()
    assert (save_dir / "model.safetensors").is_file()
    loaded = TinyMDM(checkpoint_dir=str(save_dir))
    assert loaded.config == TinyMDMConfig(hidden_size=32, num_layers=1, num_heads=2)


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs" / "shapes").glob("*.yaml")))
def test_shipped_config_parses(config: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cogrpo_lightning", "fit", "--config", f"configs/shapes/{config}", "--print_config"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "class_path" in result.stdout
