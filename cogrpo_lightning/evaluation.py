"""Held-out evaluation: base model with the predefined schedule against the trained model with the
learned schedule, at the evaluation step count T and at a quarter of it.

The baseline columns are measured once, before training, by Lightning's sanity check over the whole
validation set (``num_sanity_val_steps: -1``), and stored in the checkpoint. Without them (for
example ``validate`` on a module that never trained) the current model with the predefined schedule
is scored in their place, and the table is labelled accordingly.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from cogrpo_lightning.rewards.base import RewardModel
from cogrpo_lightning.sampling import rollout
from cogrpo_lightning.schedule.knobs import KNOB_NAMES
from cogrpo_lightning.schedule.policy import SchedulePolicy

if TYPE_CHECKING:
    from cogrpo_lightning.module import CoGRPOModule

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
OTHER_TAG = "other"
TAGS = (*GENEVAL_TAGS, OTHER_TAG)


@dataclass
class EvaluationTable:
    """Per-tag accuracy of each evaluated configuration (column) and the overall mean of tag accuracies."""

    columns: dict[str, dict[str, float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    baseline_label: str = "base"

    def metrics(self) -> dict[str, float]:
        """Flatten to ``eval/<column>/<tag>`` keys for the logger."""
        return {f"eval/{column}/{tag}": value for column, scores in self.columns.items() for tag, value in scores.items()}

    def to_markdown(self) -> str:
        """Render the table as Markdown: one row per tag plus ``overall``."""
        names = list(self.columns)
        tags = [tag for tag in TAGS if self.counts.get(tag, 0) > 0] + ["overall"]
        lines = [
            "| tag | images | " + " | ".join(names) + " |",
            "|---|---:|" + "---:|" * len(names),
        ]
        for tag in tags:
            count = sum(self.counts.values()) if tag == "overall" else self.counts[tag]
            values = " | ".join(f"{self.columns[name].get(tag, float('nan')):.3f}" for name in names)
            lines.append(f"| {tag} | {count} | {values} |")
        return "\n".join(lines)


class HeldOutEvaluator:
    """Score held-out prompts with a correctness reward (1 correct, 0 wrong) per configuration.

    Args:
        num_steps: the evaluation step count T; a quarter of it (at least 1) is evaluated too.
        images_per_prompt: images generated per prompt.
        negative_prompt: unconditional prompt for classifier-free guidance.
        seed: seed of the evaluation generators; every configuration uses the same seed for a batch.
        scorer: correctness reward; None uses the module's reward model.
    """

    def __init__(
        self,
        num_steps: int,
        images_per_prompt: int = 4,
        negative_prompt: str = "",
        seed: int = 0,
        scorer: RewardModel | None = None,
    ) -> None:
        self.step_counts = (num_steps, max(num_steps // 4, 1))
        self.images_per_prompt = images_per_prompt
        self.negative_prompt = negative_prompt
        self.seed = seed
        self.scorer = scorer
        self.baseline: dict[str, Any] | None = None
        self.last_table: EvaluationTable | None = None
        self._sums: dict[str, Tensor] = {}

    def reset(self) -> None:
        self._sums = {}

    def _columns(self, module: CoGRPOModule) -> list[tuple[str, str, int]]:
        """Return (column name, schedule kind, steps) for this validation run."""
        baseline_needed = self.baseline is None
        columns = []
        for steps in self.step_counts:
            if baseline_needed:
                columns.append((f"base_T{steps}", "predefined", steps))
            if not module.trainer.sanity_checking:
                columns.append((f"trained_T{steps}", "learned", steps))
        return columns

    @torch.no_grad()
    def evaluate_batch(self, module: CoGRPOModule, batch: Mapping[str, Any], batch_idx: int) -> None:
        prompts = list(batch["prompts"])
        metadata = list(batch.get("metadata") or [{} for _ in prompts])
        repeats = self.images_per_prompt
        expanded_metadata = [m for m in metadata for _ in range(repeats)]
        expanded_prompts = [p for p in prompts for _ in range(repeats)]
        tag_index = torch.tensor(
            [TAGS.index(m.get("tag")) if m.get("tag") in GENEVAL_TAGS else TAGS.index(OTHER_TAG) for m in expanded_metadata],
            device=module.device,
        )
        scorer = self.scorer if self.scorer is not None else module.reward
        module.mdm.eval()
        for name, kind, steps in self._columns(module):
            policy = module.policy if kind == "learned" else predefined_policy(module, steps)
            generator = torch.Generator(device=module.device)
            generator.manual_seed(self.seed * 1_000_003 + batch_idx * 7919 + module.global_rank)
            trajectory = rollout(
                module.mdm, policy, prompts, repeats, steps,
                negative_prompt=self.negative_prompt, deterministic_schedule=True, generator=generator,
            )
            correct = scorer(trajectory.images, expanded_prompts, expanded_metadata).float()
            correct = torch.nan_to_num(correct, nan=0.0)  # an unscorable image counts as failed
            sums = self._sums.setdefault(name, torch.zeros(2, len(TAGS), device=module.device))
            sums[0].index_add_(0, tag_index, correct)
            sums[1].index_add_(0, tag_index, torch.ones_like(correct))

    def finish(self, module: CoGRPOModule, store_as_baseline: bool) -> EvaluationTable | None:
        """Reduce over devices, update the baseline, print the table on rank 0 and return it."""
        if not self._sums:
            return None
        reduced = {name: module.trainer.strategy.reduce(sums, reduce_op="sum") for name, sums in self._sums.items()}
        scores = {name: _accuracies(sums) for name, sums in reduced.items()}
        counts = {tag: int(c) for tag, c in zip(TAGS, next(iter(reduced.values()))[1].tolist(), strict=True) if c > 0}
        if store_as_baseline:
            self.baseline = {"scores": {k: v for k, v in scores.items() if k.startswith("base_")}, "counts": counts}
            rank_zero_info("Held-out baseline (base model, predefined schedule):")
        label = "base"
        if self.baseline is not None and not store_as_baseline:
            scores = {**self.baseline["scores"], **scores}
        elif not store_as_baseline:
            label = "current model with the predefined schedule (no stored baseline)"
        ordered = {}
        for steps in self.step_counts:
            for prefix in ("base", "trained"):
                key = f"{prefix}_T{steps}"
                if key in scores:
                    ordered[key] = scores[key]
        table = EvaluationTable(columns=ordered, counts=counts, baseline_label=label)
        self.last_table = table
        rank_zero_info(
            f"\nHeld-out evaluation ({sum(counts.values())} images, base = {label}):\n{table.to_markdown()}\n"
        )
        return table


def _accuracies(sums: Tensor) -> dict[str, float]:
    """Per-tag accuracy and ``overall``, the mean of the tag accuracies as GenEval reports it."""
    correct, count = sums.double().cpu()
    result = {tag: float(correct[i] / count[i]) for i, tag in enumerate(TAGS) if count[i] > 0}
    result["overall"] = sum(result.values()) / max(len(result), 1)
    return result


def predefined_policy(module: CoGRPOModule, num_steps: int) -> SchedulePolicy:
    """A policy whose every knob is frozen, so it returns the predefined schedule exactly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "all four knobs are frozen" is the point here
        policy = SchedulePolicy(num_steps, module.predefined_schedule, frozen_knobs=KNOB_NAMES)
    return policy.to(module.device)
