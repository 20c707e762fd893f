"""A weighted combination of several reward models, with per-reward logging and failure isolation."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from cogrpo_lightning.rewards.base import RewardModel

logger = logging.getLogger(__name__)

COMBINATION_MODES = ("sum_then_normalize", "normalize_then_sum")


def normalize_per_group(rewards: Tensor, group_size: int, eps: float) -> Tensor:
    """Return (r - mean_g) / (std_g + eps) per group of ``group_size`` contiguous rows, NaN-aware.

    Mean and population std (divided by the count n) use the finite values of the group only, as
    the GRPO advantages do. NaN stays NaN. A group whose finite values are all equal, or that has
    fewer than 2 of them, gives 0 for its finite values.
    """
    values = rewards.detach().to(torch.float64).view(-1, group_size)  # [B, G]
    finite = torch.isfinite(values)
    counts = finite.sum(dim=1, keepdim=True).clamp_min(1)  # [B, 1]
    means = torch.where(finite, values, 0.0).sum(dim=1, keepdim=True) / counts
    deviations = torch.where(finite, values - means, 0.0)
    stds = (deviations.square().sum(dim=1, keepdim=True) / counts).sqrt()
    highest = torch.where(finite, values, -math.inf).amax(dim=1, keepdim=True)
    lowest = torch.where(finite, values, math.inf).amin(dim=1, keepdim=True)
    flat = (finite.sum(dim=1, keepdim=True) < 2) | (highest == lowest)
    normalized = torch.where(flat, 0.0, deviations / (stds + eps))
    normalized = torch.where(finite, normalized, math.nan)
    return normalized.view(-1).to(torch.float32)  # [N]


class WeightedReward(RewardModel):
    """Weighted sum of several reward models: ``total = sum_k w_k * r_k``.

    Args:
        rewards: reward models by name, or a list that takes each model's ``name`` attribute
            (``hpsv2``, ``pickscore``, ...; repeats get ``_2``, ``_3``). The name is used in the
            logged metric keys (``rewards/<name>/mean``) and must not contain ``.``. In YAML each
            model is a ``class_path`` / ``init_args`` block.
        weights: weight of each reward by name (missing names weigh 1.0), or a list in the order of
            ``rewards``. A reward with weight 0 is still scored and logged but does not enter the
            total, not even as NaN.
        mode: ``"sum_then_normalize"`` sums the raw scores, and GRPO then normalises the total per
            group. ``"normalize_then_sum"`` first normalises each reward per group of ``group_size``
            samples, (r - mean_g) / (std_g + eps), so that rewards on different scales count by
            their weights only.
        group_size: G, samples per prompt in contiguous rows; needed by ``normalize_then_sum``. Link
            it from the training module's group size instead of setting it twice.
        eps: added to the group std in ``normalize_then_sum``.

    A reward that raises for a batch is retried one sample at a time; the samples that still fail
    get NaN, and the error is logged once per reward and error type with the failing indices. A
    sample that is NaN in any component with non-zero weight is NaN in the total.
    """

    name = "weighted"

    def __init__(
        self,
        rewards: dict[str, RewardModel] | list[RewardModel],
        weights: dict[str, float] | list[float] | None = None,
        mode: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize",
        group_size: int | None = None,
        eps: float = 1e-4,
    ) -> None:
        super().__init__()
        if isinstance(rewards, (Mapping, nn.ModuleDict)):
            rewards = dict(rewards.items())
        else:
            rewards = self._name_by_class_attribute(list(rewards))
        problems = []
        if not rewards:
            problems.append("rewards is empty; pass at least one reward model by name")
        bad_names = [name for name in rewards if not name or "." in name]
        if bad_names:
            problems.append(f"reward names must be non-empty and contain no '.', got {bad_names}")
        if mode not in COMBINATION_MODES:
            problems.append(f"mode must be one of {', '.join(COMBINATION_MODES)}, got {mode!r}")
        if group_size is not None and group_size < 2:
            problems.append(f"group_size must be at least 2 (GRPO compares samples of a prompt), got {group_size}")
        if not (math.isfinite(eps) and eps >= 0):
            problems.append(f"eps must be a finite number >= 0, got {eps}")
        resolved_weights, weight_problem = self._resolve_weights(list(rewards), weights)
        if weight_problem:
            problems.append(weight_problem)
        if problems:
            raise ValueError("invalid WeightedReward options: " + "; ".join(problems))

        self.rewards = nn.ModuleDict(rewards)
        self.weights = resolved_weights
        self.mode = mode
        self.group_size = group_size
        self.eps = float(eps)
        self.last_components: dict[str, Tensor] = {}
        self._logged_errors: set[tuple[str, str]] = set()

    @staticmethod
    def _name_by_class_attribute(rewards: list[RewardModel]) -> dict[str, RewardModel]:
        named: dict[str, RewardModel] = {}
        for reward in rewards:
            base = getattr(reward, "name", type(reward).__name__)
            name, suffix = base, 2
            while name in named:  # a second HPS scorer becomes "hpsv2_2"
                name, suffix = f"{base}_{suffix}", suffix + 1
            named[name] = reward
        return named

    @staticmethod
    def _resolve_weights(
        names: list[str], weights: Mapping[str, float] | Sequence[float] | None
    ) -> tuple[dict[str, float], str | None]:
        if weights is None:
            return {name: 1.0 for name in names}, None
        if isinstance(weights, Mapping):
            unknown = sorted(set(weights) - set(names))
            if unknown:
                return {}, f"weights name rewards that do not exist: {unknown} (rewards: {names})"
            resolved = {name: float(weights.get(name, 1.0)) for name in names}
        else:
            if len(weights) != len(names):
                return {}, f"got {len(weights)} weights for {len(names)} rewards {names}"
            resolved = {name: float(weight) for name, weight in zip(names, weights, strict=True)}
        not_finite = {name: weight for name, weight in resolved.items() if not math.isfinite(weight)}
        if not_finite:
            return {}, f"weights must be finite numbers, got {not_finite}"
        return resolved, None

    def _log_failure_once(self, name: str, error: BaseException, failed: list[int], num_samples: int) -> None:
        key = (name, type(error).__name__)
        if key in self._logged_errors:
            return
        self._logged_errors.add(key)
        if not failed:
            logger.warning(
                "reward %r raised %s on a batch of %d samples but scored each sample alone: %s. "
                "This is logged once per reward and error type.",
                name,
                type(error).__name__,
                num_samples,
                error,
            )
            return
        logger.error(
            "reward %r raised %s on %d of %d samples (indices %s): %s; those samples get NaN reward. "
            "This error is logged once per reward and error type.",
            name,
            type(error).__name__,
            len(failed),
            num_samples,
            failed,
            error,
        )

    def _score_one_reward(
        self, name: str, reward: nn.Module, images: Tensor, prompts: list[str], metadata: list[Mapping[str, Any]]
    ) -> Tensor:
        """Score with one reward; on an exception, retry sample by sample and give NaN where it fails."""
        num_samples = images.shape[0]
        try:
            scores = reward(images, prompts, metadata)
            if scores.shape != (num_samples,):
                raise ValueError(f"returned shape {list(scores.shape)}, expected [{num_samples}]")
            return scores.detach().to(device=images.device, dtype=torch.float32)
        except Exception as error:  # any scorer failure must cost samples, never the step
            batch_error = error

        scores = torch.full((num_samples,), math.nan, device=images.device)
        failed: list[int] = []
        sample_error: BaseException | None = None
        for index in range(num_samples):
            try:
                value = reward(images[index : index + 1], prompts[index : index + 1], metadata[index : index + 1])
                if value.shape != (1,):
                    raise ValueError(f"returned shape {list(value.shape)} for one sample, expected [1]")
                scores[index] = value.detach().to(device=images.device, dtype=torch.float32)[0]
            except Exception as error:
                failed.append(index)
                sample_error = sample_error or error
        self._log_failure_once(name, sample_error or batch_error, failed, num_samples)
        return scores

    def _check_groups(self, prompts: list[str]) -> int:
        if self.group_size is None:
            raise ValueError(
                "mode='normalize_then_sum' needs group_size (samples per prompt); set it or link it "
                "from the training module's group size"
            )
        if len(prompts) % self.group_size != 0:
            raise ValueError(f"got {len(prompts)} samples, not a multiple of group_size={self.group_size}")
        for start in range(0, len(prompts), self.group_size):
            if len(set(prompts[start : start + self.group_size])) > 1:
                raise ValueError(
                    f"samples {start}..{start + self.group_size - 1} have different prompts; "
                    "normalize_then_sum expects the group_size samples of a prompt in contiguous rows"
                )
        return self.group_size

    def score(self, images: Tensor, prompts: list[str], metadata: list[Mapping[str, Any]]) -> Tensor:
        group_size = self._check_groups(prompts) if self.mode == "normalize_then_sum" else None
        components = {
            name: self._score_one_reward(name, reward, images, prompts, metadata) for name, reward in self.rewards.items()
        }
        self.last_components = components

        total = torch.zeros(images.shape[0], device=images.device)
        for name, raw in components.items():
            weight = self.weights[name]
            if weight == 0.0:
                continue
            term = normalize_per_group(raw, group_size, self.eps) if group_size else raw
            total = total + weight * term  # NaN in a weighted term makes the total NaN
        return total

    def log_metrics(self) -> dict[str, float]:
        """Return ``rewards/<name>/mean``, ``/std`` (population) and ``/frac_nan`` of the last raw scores.

        Mean and std use the finite scores only; they are NaN when a reward had no finite score.
        """
        metrics: dict[str, float] = {}
        for name, raw in self.last_components.items():
            finite = raw[torch.isfinite(raw)].double()
            mean = float(finite.mean()) if finite.numel() else math.nan
            std = float(finite.std(correction=0)) if finite.numel() else math.nan
            metrics[f"rewards/{name}/mean"] = mean
            metrics[f"rewards/{name}/std"] = std
            metrics[f"rewards/{name}/frac_nan"] = 1.0 - finite.numel() / max(raw.numel(), 1)
        return metrics
