"""Run a tiny Co-GRPO fit on 2 CPU processes and save each rank's weights, for test_distributed.py.

Usage: python tests/ddp_script.py OUT_DIR --mode joint --strategy ddp

Lightning starts the second process by running this script again with rank variables set. After
one update each rank writes ``OUT_DIR/rank<r>.pt`` with its state_dict and the prompts it drew, and
rank 0 also writes ``OUT_DIR/initial.pt`` with the weights before training. Only loopback is used.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from cogrpo_lightning.data import PromptDataModule
from cogrpo_lightning.mdm.tiny import TinyMDM, TinyMDMConfig
from cogrpo_lightning.module import CoGRPOModule
from cogrpo_lightning.rewards.base import RewardModel

GROUP_SIZE = 4
PROMPTS_PER_BATCH = 2
WORLD_SIZE = 2


class BrightnessReward(RewardModel):
    """Mean pixel value of each image, so that no group is flat."""

    def score(self, images: Tensor, prompts: list[str], metadata: list[Mapping[str, Any]]) -> Tensor:
        return images.mean(dim=(1, 2, 3))


class PromptRecorder(pl.Callback):
    """Stores the training prompts this rank drew."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.prompts.extend(batch["prompts"])


class StepChanges(pl.Callback):
    """Stores, for every training step, whether it changed the MDM and the schedule policy."""

    def __init__(self) -> None:
        self.changes: list[dict[str, bool]] = []
        self._before: dict[str, list[Tensor]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        self._before = {"model": local_values(module.mdm), "schedule": local_values(module.policy)}

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        after = {"model": local_values(module.mdm), "schedule": local_values(module.policy)}
        self.changes.append(
            {
                name: any(not torch.equal(old, new) for old, new in zip(self._before[name], after[name], strict=True))
                for name in after
            }
        )


def local_values(module: torch.nn.Module) -> list[Tensor]:
    """Return copies of this rank's parameter values (its shards where FSDP2 split them)."""
    values = []
    for parameter in module.parameters():
        value = parameter.detach()
        if hasattr(value, "to_local"):
            value = value.to_local()
        values.append(value.clone())
    return values


def build_strategy(name: str) -> Any:
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend="gloo", find_unused_parameters=True)
    if name == "ddp_static":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend="gloo", find_unused_parameters=False)
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=WORLD_SIZE, tensor_parallel_size=1)
    raise ValueError(f"unknown strategy {name!r}; use ddp, ddp_static or fsdp2")


def full_state(module: CoGRPOModule) -> dict[str, Tensor]:
    """Return the module's trainable tensors, gathered from shards where FSDP2 split them."""
    state = {}
    for name, parameter in module.named_parameters():
        value = parameter.detach()
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        state[name] = value.clone().cpu()
    return state


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--mode", default="joint")
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--num-updates", type=int, default=1)
    parser.add_argument("--train-steps-per-rollout", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    torch.manual_seed(0)
    module = CoGRPOModule(
        mdm=TinyMDM(TinyMDMConfig(hidden_size=32, num_layers=1, num_heads=2)),
        reward=BrightnessReward(),
        group_size=GROUP_SIZE,
        num_steps=4,
        mode=args.mode,
        model_lr=1e-3,
        eval_images_per_prompt=1,
        train_steps_per_rollout=args.train_steps_per_rollout,
    )
    initial = full_state(module)
    data = PromptDataModule(
        prompts_per_batch=PROMPTS_PER_BATCH,
        group_size=GROUP_SIZE,
        val_prompts_per_batch=2,
        max_train_prompts=WORLD_SIZE * PROMPTS_PER_BATCH * args.num_updates,
        shuffle=False,
    )
    recorder = PromptRecorder()
    step_changes = StepChanges()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE,
        strategy=build_strategy(args.strategy),
        max_epochs=1,
        limit_train_batches=args.num_updates,
        limit_val_batches=1,
        num_sanity_val_steps=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder, step_changes],
        default_root_dir=str(args.out_dir),
    )
    trainer.fit(module, data)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    rank = trainer.global_rank
    final = full_state(module)
    torch.save(
        {
            "state": final,
            "prompts": recorder.prompts,
            "num_updates": module.num_updates,
            "step_changes": step_changes.changes,
        },
        args.out_dir / f"rank{rank}.pt",
    )
    if rank == 0:
        torch.save(initial, args.out_dir / "initial.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
