"""One step of confidence-based masked-token sampling, with four knobs set per sample.

Shapes follow the legend in :mod:`cogrpo_lightning.sampling`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cogrpo_lightning.schedule.knobs import (
    CFG_SCALE,
    NUM_KNOBS,
    REMASK_RATIO,
    REMASK_TEMPERATURE,
    SAMPLING_TEMPERATURE,
)

# Model log-probs below this floor are raised to it before guidance, because a backend that returns
# -inf for forbidden codes would otherwise give NaN in uncond + w * (cond - uncond). The log_softmax
# of ordinary logits stays far above the floor, so only -inf and near -inf values change.
LOG_PROB_FLOOR = -1.0e4
# Sampling temperatures below this (including 0) are raised to it, so that dividing by tau_s stays
# finite in float32. At 1e-4 a logit gap of 1e-3 already makes the lower code e^-10 times as likely.
MIN_SAMPLING_TEMPERATURE = 1.0e-4


def guidance_needed(cfg_scale: Tensor) -> bool:
    """Return whether any sample uses classifier-free guidance: cfg_scale [N] differs from exactly 1."""
    return bool((cfg_scale != 1).any())


def sampling_log_probs(
    cond_log_probs: Tensor,
    uncond_log_probs: Tensor | None,
    cfg_scale: Tensor,
    temperature: Tensor,
) -> Tensor:
    """Compute the log-probs the sampler draws from: [N, L, V] float32.

    The result is ``log_softmax((uncond + w * (cond - uncond)) / tau_s)`` per sample, computed in
    float32 with autocast disabled. Rollout and training both call this function, so with
    unchanged parameters they compute the same distribution and the importance ratio is 1.

    Args:
        cond_log_probs: [N, L, V] model log-probs under the prompt condition, any float dtype.
        uncond_log_probs: [N, L, V] model log-probs under the unconditional condition, or None
            when no sample uses guidance.
        cfg_scale: [N] guidance scale w. A sample with w == 1 is unguided.
        temperature: [N] sampling temperature tau_s, non-negative. Values below
            MIN_SAMPLING_TEMPERATURE are raised to it.

    Raises:
        ValueError: on mismatched shapes, or when `uncond_log_probs` is None but some w != 1.
    """
    if cond_log_probs.ndim != 3:
        raise ValueError(f"cond_log_probs must have shape [N, L, V], got {list(cond_log_probs.shape)}")
    num_samples = cond_log_probs.shape[0]
    for name, value in (("cfg_scale", cfg_scale), ("temperature", temperature)):
        if tuple(value.shape) != (num_samples,):
            raise ValueError(f"{name} must have shape [{num_samples}], got {list(value.shape)}")
    if uncond_log_probs is not None and uncond_log_probs.shape != cond_log_probs.shape:
        raise ValueError(
            f"uncond_log_probs must match cond_log_probs {list(cond_log_probs.shape)}, "
            f"got {list(uncond_log_probs.shape)}"
        )

    with torch.autocast(device_type=cond_log_probs.device.type, enabled=False):
        cond = cond_log_probs.float().clamp(min=LOG_PROB_FLOOR)
        if uncond_log_probs is None:
            if guidance_needed(cfg_scale):
                raise ValueError(
                    "uncond_log_probs is None but some cfg_scale differs from 1; "
                    "pass the unconditional log-probs or set cfg_scale to 1 for every sample"
                )
            logits = cond
        else:
            uncond = uncond_log_probs.float().clamp(min=LOG_PROB_FLOOR)
            scale = cfg_scale.to(device=cond.device, dtype=torch.float32).view(-1, 1, 1)
            logits = uncond + scale * (cond - uncond)
        divisor = temperature.to(device=cond.device, dtype=torch.float32).clamp(min=MIN_SAMPLING_TEMPERATURE)
        divisor = divisor.view(-1, 1, 1)
        return torch.log_softmax(logits / divisor, dim=-1)


def num_masked_after_step(
    num_masked: Tensor,
    remask_ratio: Tensor,
    num_tokens: int,
    step_index: int,
    num_steps: int,
    min_tokens_per_step: int = 1,
) -> Tensor:
    """Count the tokens that stay masked after a step: [N] int64.

    The target is ``floor(L * r)``, a fraction of all L tokens, not of the masked ones. It is
    clamped to ``[0, num_masked - min_tokens_per_step]`` so that each step fills at least
    `min_tokens_per_step` tokens (or all that remain), and the last step keeps none. A ratio
    outside [0, 1] is therefore clamped too. The product is computed in float64 and floored with a
    tolerance of ``L * 1e-6`` tokens, so a float32 r = 0.7 with L = 10 keeps 7 tokens, not 6.

    Args:
        num_masked: [N] number of masked tokens before the step.
        remask_ratio: [N] re-mask ratio r.
        num_tokens: L, the number of image tokens per sample.
        step_index: index t of this step, in [0, num_steps).
        num_steps: T, the number of steps.
        min_tokens_per_step: minimum number of tokens each step fills while any remain masked.
    """
    if not 0 <= step_index < num_steps:
        raise ValueError(f"step_index must be in [0, {num_steps - 1}], got {step_index}")
    num_masked = num_masked.long()
    if step_index == num_steps - 1:
        return torch.zeros_like(num_masked)
    target = remask_ratio.double().clamp(0.0, 1.0) * num_tokens
    target = torch.floor(target + num_tokens * 1e-6).long()
    upper = (num_masked - min_tokens_per_step).clamp(min=0)
    return torch.minimum(target, upper)


@dataclass
class SamplerStepOutput:
    """Result of one :meth:`MaskedSampler.step`.

    Attributes:
        next_ids: [N, L] canvas after the step, with the mask id where tokens stay masked.
        fill_mask: [N, L] bool, True at positions filled at this step.
        token_log_probs: [N, L] float32 log-prob of each filled token under the sampling
            distribution, 0 at other positions.
    """

    next_ids: Tensor
    fill_mask: Tensor
    token_log_probs: Tensor


class MaskedSampler:
    """The confidence-based masked-token sampler whose four knobs a schedule policy sets per step.

    Args:
        mask_token_id: id of the mask token, outside [0, V).
        min_tokens_per_step: minimum number of tokens each step fills while any remain masked.
    """

    def __init__(self, mask_token_id: int, *, min_tokens_per_step: int = 1) -> None:
        if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int):
            raise TypeError(f"mask_token_id must be an int, got {type(mask_token_id).__name__}")
        if isinstance(min_tokens_per_step, bool) or not isinstance(min_tokens_per_step, int):
            raise TypeError(f"min_tokens_per_step must be an int, got {type(min_tokens_per_step).__name__}")
        if min_tokens_per_step < 1:
            raise ValueError(f"min_tokens_per_step must be at least 1, got {min_tokens_per_step}")
        self.mask_token_id = mask_token_id
        self.min_tokens_per_step = min_tokens_per_step

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mask_token_id={self.mask_token_id}, "
            f"min_tokens_per_step={self.min_tokens_per_step})"
        )

    def step(
        self,
        token_ids: Tensor,
        cond_log_probs: Tensor,
        uncond_log_probs: Tensor | None,
        knobs: Tensor,
        step_index: int,
        num_steps: int,
        generator: torch.Generator | None = None,
    ) -> SamplerStepOutput:
        """Fill part of the masked positions of `token_ids` and re-mask the rest.

        Args:
            token_ids: [N, L] current canvas V_t, the mask id at masked positions.
            cond_log_probs: [N, L, V] model log-probs under the prompt condition.
            uncond_log_probs: [N, L, V] model log-probs under the unconditional condition, or
                None when every sample has w == 1.
            knobs: [N, S] knob values (r, tau_s, tau_r, w), all finite. tau_s and tau_r must be
                non-negative. r outside [0, 1] is clamped (see num_masked_after_step).
            step_index: index t of this step, in [0, num_steps).
            num_steps: T, the number of steps.
            generator: random generator on the device of the tensors, for token draws and noise.

        Raises:
            ValueError: on mismatched shapes or invalid knob values.
        """
        if token_ids.ndim != 2:
            raise ValueError(f"token_ids must have shape [N, L], got {list(token_ids.shape)}")
        num_samples, num_tokens = token_ids.shape
        if tuple(cond_log_probs.shape[:2]) != (num_samples, num_tokens) or cond_log_probs.ndim != 3:
            raise ValueError(
                f"cond_log_probs must have shape [{num_samples}, {num_tokens}, V], "
                f"got {list(cond_log_probs.shape)}"
            )
        _check_knobs(knobs, num_samples)

        is_masked = token_ids == self.mask_token_id
        num_masked = is_masked.sum(dim=1)
        zero_log_probs = torch.zeros(num_samples, num_tokens, dtype=torch.float32, device=token_ids.device)
        if not bool(is_masked.any()):
            # More steps than tokens: nothing is left to fill, and a draw over zero rows would fail.
            no_fill = torch.zeros_like(is_masked)
            return SamplerStepOutput(token_ids.clone(), no_fill, zero_log_probs)

        log_probs = sampling_log_probs(
            cond_log_probs, uncond_log_probs, knobs[:, CFG_SCALE], knobs[:, SAMPLING_TEMPERATURE]
        )

        # Draw only at masked positions, so committed tokens are never drawn again.
        masked_rows = log_probs[is_masked]
        drawn = torch.multinomial(masked_rows.exp(), num_samples=1, generator=generator)
        candidate_ids = token_ids.clone()
        candidate_ids[is_masked] = drawn.squeeze(1).to(token_ids.dtype)
        drawn_log_probs = zero_log_probs.clone()
        drawn_log_probs[is_masked] = masked_rows.gather(1, drawn).squeeze(1)

        # Confidence in float64: log-prob plus tau_r-scaled Gumbel noise. Committed positions get
        # +inf, so they sort last and are never re-masked.
        uniform = torch.rand(
            num_samples, num_tokens, generator=generator, dtype=torch.float64, device=token_ids.device
        )
        uniform = uniform.clamp(min=torch.finfo(torch.float64).tiny)
        gumbel = -torch.log(-torch.log(uniform))
        remask_temperature = knobs[:, REMASK_TEMPERATURE].double().unsqueeze(1)
        confidence = drawn_log_probs.double() + remask_temperature * gumbel
        confidence = confidence.masked_fill(~is_masked, float("inf"))

        # Re-mask the keep_masked[n] least confident draws of sample n: rank every position per row,
        # then compare ranks with the per-sample count. No loop over samples.
        keep_masked = num_masked_after_step(
            num_masked,
            knobs[:, REMASK_RATIO],
            num_tokens,
            step_index,
            num_steps,
            self.min_tokens_per_step,
        )
        order = confidence.argsort(dim=1, stable=True)
        positions = torch.arange(num_tokens, device=token_ids.device).expand(num_samples, num_tokens)
        ranks = torch.empty_like(order).scatter_(1, order, positions)
        remask = ranks < keep_masked.unsqueeze(1)

        fill_mask = is_masked & ~remask
        next_ids = torch.where(fill_mask, candidate_ids, token_ids)
        token_log_probs = torch.where(fill_mask, drawn_log_probs, zero_log_probs)
        return SamplerStepOutput(next_ids, fill_mask, token_log_probs)


def _check_knobs(knobs: Tensor, num_samples: int) -> None:
    if tuple(knobs.shape) != (num_samples, NUM_KNOBS):
        raise ValueError(f"knobs must have shape [{num_samples}, {NUM_KNOBS}], got {list(knobs.shape)}")
    checks = (
        (torch.isfinite(knobs).all(dim=1), "every knob must be finite"),
        (
            knobs[:, SAMPLING_TEMPERATURE] >= 0,
            f"the sampling temperature (knob {SAMPLING_TEMPERATURE}) must be >= 0",
        ),
        (
            knobs[:, REMASK_TEMPERATURE] >= 0,
            f"the re-mask temperature (knob {REMASK_TEMPERATURE}) must be >= 0",
        ),
    )
    for valid_rows, rule in checks:
        if not bool(valid_rows.all()):
            row = int((~valid_rows).nonzero()[0, 0])
            raise ValueError(f"invalid knobs: {rule}, but sample {row} has knobs {knobs[row].tolist()}")
