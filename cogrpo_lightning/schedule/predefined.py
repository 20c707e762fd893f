"""The hand-designed inference schedule that a masked diffusion model samples with by default."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from cogrpo_lightning.schedule.knobs import (
    CFG_SCALE,
    NUM_KNOBS,
    REMASK_RATIO,
    REMASK_TEMPERATURE,
    SAMPLING_TEMPERATURE,
)

REMASK_RATIO_KINDS: tuple[str, ...] = ("cosine", "linear")


def validate_num_steps(num_steps: int) -> None:
    """Raise ValueError unless num_steps is an integer >= 1."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")


@dataclass(frozen=True)
class PredefinedSchedule:
    """Per-step values of the four schedule knobs, as functions of the step t = 0 .. T-1.

    The defaults are a cosine re-mask ratio, sampling temperature 1 and a re-mask temperature that
    falls linearly from 2 to 0. Classifier-free guidance is written
    ``logits = uncond + cfg_scale * (cond - uncond)``, so ``cfg_scale = 1`` means no guidance.

    Args:
        remask_ratio: r_t, the fraction of the L tokens that is still masked after step t.
            ``"cosine"``: r_t = cos(pi/2 * (t+1)/T). ``"linear"``: r_t = 1 - (t+1)/T. Both give
            exactly 0 at the last step, so the last step fills every remaining token.
        sampling_temperature: tau_s, the softmax temperature for drawing tokens, constant over the
            steps (> 0).
        remask_temperature_start: tau_r at the first step, the scale of the Gumbel noise added to
            token confidence before choosing which tokens to re-mask (>= 0).
        remask_temperature_end: tau_r at the last step (>= 0). In between,
            tau_r(t) = start + (end - start) * t / max(T - 1, 1). A single-step schedule (T = 1)
            uses start, which does not matter there because that step fills every token.
        cfg_scale: w, the classifier-free guidance scale, constant over the steps (> 0, because the
            schedule policy squashes it with softplus). 1.0 means no guidance and needs no
            unconditional forward pass.
    """

    remask_ratio: Literal["cosine", "linear"] = "cosine"
    sampling_temperature: float = 1.0
    remask_temperature_start: float = 2.0
    remask_temperature_end: float = 0.0
    cfg_scale: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if self.remask_ratio not in REMASK_RATIO_KINDS:
            problems.append(
                f"remask_ratio must be one of {', '.join(REMASK_RATIO_KINDS)}, got {self.remask_ratio!r}"
            )
        if not _is_number_above(self.sampling_temperature, 0.0, strict=True):
            problems.append(
                f"sampling_temperature must be a finite number > 0, got {self.sampling_temperature!r}"
            )
        if not _is_number_above(self.remask_temperature_start, 0.0, strict=False):
            problems.append(
                f"remask_temperature_start must be a finite number >= 0, got {self.remask_temperature_start!r}"
            )
        if not _is_number_above(self.remask_temperature_end, 0.0, strict=False):
            problems.append(
                f"remask_temperature_end must be a finite number >= 0, got {self.remask_temperature_end!r}"
            )
        if not _is_number_above(self.cfg_scale, 0.0, strict=True):
            problems.append(
                f"cfg_scale must be a finite number > 0 (1.0 means no guidance), got {self.cfg_scale!r}"
            )
        if problems:
            raise ValueError("invalid PredefinedSchedule: " + "; ".join(problems))

    def remask_ratios(self, num_steps: int) -> Tensor:
        """Return r_t for t = 0 .. T-1 as float64 [T], falling from near 1 to exactly 0."""
        validate_num_steps(num_steps)
        # remaining[t] = (T - 1 - t) / T = 1 - (t+1)/T, exact at the last step (0) for any T
        remaining = torch.arange(num_steps - 1, -1, -1, dtype=torch.float64) / num_steps  # [T]
        if self.remask_ratio == "linear":
            return remaining
        # cos(pi/2 * (t+1)/T) = sin(pi/2 * remaining): the sine form gives exactly 0.0 at the last
        # step, where cos(pi/2) would give 6.1e-17 and leave a nonzero ratio.
        return torch.sin(remaining * (math.pi / 2))

    def remask_temperatures(self, num_steps: int) -> Tensor:
        """Return tau_r(t) = start + (end - start) * t / max(T-1, 1) as float64 [T]."""
        validate_num_steps(num_steps)
        progress = torch.arange(num_steps, dtype=torch.float64) / max(num_steps - 1, 1)  # [T]
        start, end = self.remask_temperature_start, self.remask_temperature_end
        temperatures = start + (end - start) * progress
        if num_steps > 1:
            # start + (end - start) * 1.0 can differ from end by rounding, so the last step uses end itself
            temperatures[-1] = end
        return temperatures

    def values(
        self, num_steps: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> Tensor:
        """Return the schedule as [T, S], columns in the order of ``KNOB_NAMES``.

        Values are computed in float64 and then cast to ``dtype``.
        """
        validate_num_steps(num_steps)
        table = torch.empty(num_steps, NUM_KNOBS, dtype=torch.float64)  # [T, S]
        table[:, REMASK_RATIO] = self.remask_ratios(num_steps)
        table[:, SAMPLING_TEMPERATURE] = self.sampling_temperature
        table[:, REMASK_TEMPERATURE] = self.remask_temperatures(num_steps)
        table[:, CFG_SCALE] = self.cfg_scale
        return table.to(dtype=dtype, device=device)


def _is_number_above(value: object, bound: float, strict: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value > bound if strict else value >= bound
