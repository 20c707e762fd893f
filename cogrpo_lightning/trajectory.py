"""The compact record of one rollout that the GRPO update replays step by step.

Shapes follow the legend in :mod:`cogrpo_lightning.sampling`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cogrpo_lightning.schedule.knobs import NUM_KNOBS

# fill_step is stored as int16 while every step index fits, which halves its memory against int32.
_INT16_MAX = torch.iinfo(torch.int16).max


def fill_step_dtype(num_steps: int) -> torch.dtype:
    """Return the smallest integer dtype that stores step indices 0..num_steps: int16 or int32."""
    return torch.int16 if num_steps <= _INT16_MAX else torch.int32


@dataclass
class Trajectory:
    """One rollout of N samples over T steps, stored without per-step canvases or logits.

    Every image position is filled exactly once, so the canvas V_t that the model saw at step t is
    rebuilt from the final ids and the step at which each position was filled
    (:meth:`token_ids_before`). Memory is therefore 10 bytes per token (int32 id, int16 fill step,
    float32 log-prob), i.e. ``10 * N * L`` bytes, plus ``4 * T * N * (2 * S + 1)`` bytes of
    schedule data, ``4 * T * N * F`` bytes of features when the policy uses features, and the
    decoded images if stored. No tensor has a codebook (V) dimension.

    Attributes:
        final_ids: [N, L] int32 image token ids after the last step, all in [0, V).
        fill_step: [N, L] int16 (int32 when T > 32767), the step index at which each position was filled.
        actions: [T, N, S] float32 schedule actions drawn from the policy.
        knobs: [T, N, S] float32 knob values (r, tau_s, tau_r, w) that the sampler used at each step.
        old_token_log_probs: [N, L] float32 log-prob of each token under the sampling distribution of
            the step that filled it.
        old_schedule_log_probs: [T, N] float32 policy log-prob of each action at rollout time.
        features: [T, N, F] float32 pooled model features the policy saw, or None if the policy
            does not use features.
        prompt_index: [N] int64 position of each sample's prompt in the rollout's prompt list.
            Rows b*G .. b*G+G-1 belong to prompt b.
        group_index: [N] int64 group of each sample for advantage normalisation. A rollout sets it
            equal to prompt_index, so group b is rows b*G .. b*G+G-1. It is a separate field so that
            a trainer can renumber prompt_index (e.g. to dataset ids) without changing the groups.
        num_steps: number of sampling steps T.
        mask_token_id: id of the mask token, outside [0, V).
        images: [N, 3, H, W] float images in [0, 1] decoded from final_ids, or None.
        rewards: [N] float32 rewards, or None until scored.
        advantages: [N] float32 advantages, or None until computed.
    """

    final_ids: Tensor
    fill_step: Tensor
    actions: Tensor
    knobs: Tensor
    old_token_log_probs: Tensor
    old_schedule_log_probs: Tensor
    features: Tensor | None
    prompt_index: Tensor
    group_index: Tensor
    num_steps: int
    mask_token_id: int
    images: Tensor | None = None
    rewards: Tensor | None = None
    advantages: Tensor | None = None

    def __post_init__(self) -> None:
        if self.final_ids.ndim != 2:
            raise ValueError(f"final_ids must have shape [N, L], got {list(self.final_ids.shape)}")
        num_samples, num_tokens = self.final_ids.shape
        steps = self.num_steps
        expected_shapes: dict[str, tuple[int, ...]] = {
            "fill_step": (num_samples, num_tokens),
            "actions": (steps, num_samples, NUM_KNOBS),
            "knobs": (steps, num_samples, NUM_KNOBS),
            "old_token_log_probs": (num_samples, num_tokens),
            "old_schedule_log_probs": (steps, num_samples),
            "prompt_index": (num_samples,),
            "group_index": (num_samples,),
        }
        for name, shape in expected_shapes.items():
            actual = tuple(getattr(self, name).shape)
            if actual != shape:
                raise ValueError(f"Trajectory.{name} must have shape {list(shape)}, got {list(actual)}")
        if self.features is not None and tuple(self.features.shape[:2]) != (steps, num_samples):
            raise ValueError(
                f"Trajectory.features must have shape [{steps}, {num_samples}, F], "
                f"got {list(self.features.shape)}"
            )
        for name in ("rewards", "advantages"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (num_samples,):
                raise ValueError(
                    f"Trajectory.{name} must have shape [{num_samples}], got {list(value.shape)}"
                )

    @property
    def num_samples(self) -> int:
        """Number of samples N."""
        return self.final_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """Number of image tokens L per sample."""
        return self.final_ids.shape[1]

    def _check_step(self, step: int, *, allow_end: bool = False) -> None:
        upper = self.num_steps if allow_end else self.num_steps - 1
        if not 0 <= step <= upper:
            raise IndexError(f"step must be in [0, {upper}], got {step}")

    def token_ids_before(self, step: int) -> Tensor:
        """Rebuild the canvas V_t the model saw at `step`: [N, L] int64.

        Positions filled before `step` hold their final id and all others hold the mask id.
        ``step == num_steps`` returns the final canvas.
        """
        self._check_step(step, allow_end=True)
        mask = torch.full_like(self.final_ids, self.mask_token_id, dtype=torch.long)
        return torch.where(self.fill_step < step, self.final_ids.long(), mask)

    def fill_mask(self, step: int) -> Tensor:
        """Return the positions filled at `step`: [N, L] bool."""
        self._check_step(step)
        return self.fill_step == step

    def old_token_log_probs_at(self, step: int) -> Tensor:
        """Return the rollout log-probs of the tokens filled at `step`, 0 elsewhere: [N, L] float32."""
        fill_mask = self.fill_mask(step)
        return torch.where(fill_mask, self.old_token_log_probs, torch.zeros_like(self.old_token_log_probs))

    def active_samples(self, step: int) -> Tensor:
        """Return the samples that filled at least one token at `step`: [N] bool.

        A sample with no masked token left at `step` is inactive, so its schedule action there had
        no effect on its image.
        """
        return self.fill_mask(step).any(dim=1)

    def to(self, device: torch.device | str) -> Trajectory:
        """Return a copy with every tensor moved to `device`."""
        moved: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            moved[field.name] = value.to(device) if isinstance(value, Tensor) else value
        return Trajectory(**moved)

    def select(self, index: Tensor | slice) -> Trajectory:
        """Return the trajectory of a subset of samples, e.g. one micro-batch.

        `index` selects along N (a slice, an int64 index tensor [M] or a bool mask [N]). The caller
        must select the same rows of the conditions passed to ``recompute_log_probs``.
        """
        values: dict[str, Any] = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        for name in ("final_ids", "fill_step", "old_token_log_probs", "prompt_index", "group_index"):
            values[name] = values[name][index]
        for name in ("actions", "knobs", "old_schedule_log_probs", "features"):
            if values[name] is not None:
                values[name] = values[name][:, index]
        for name in ("images", "rewards", "advantages"):
            if values[name] is not None:
                values[name] = values[name][index]
        return Trajectory(**values)
