"""GRPO maths as pure functions: group-relative advantages, the clipped surrogate loss and KL estimators.

Shapes: B prompts, G samples per prompt (group size), N = B*G samples, L image tokens. The G samples
of prompt b are the contiguous rows b*G .. b*G + G - 1 of every [N, ...] tensor.

Nothing here touches Lightning or a model, so each function is testable on hand-made tensors.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

ADVANTAGE_SCALES: tuple[str, ...] = ("group", "batch", "none")
SURROGATE_LEVELS: tuple[str, ...] = ("token", "step")


class RewardWarning(UserWarning):
    """Warning about rewards that GRPO cannot learn from: non-finite rewards or groups with one value."""


@dataclass
class AdvantageResult:
    """Group-relative advantages and the reward statistics behind them.

    Attributes:
        advantages: [N] float32. Zero for samples with a non-finite reward and for every sample of a
            zero-std group.
        valid_mask: [N] bool, True where the reward is finite. Pass it as ``sample_mask`` to
            :func:`clipped_surrogate` so that samples without a reward are left out of the loss.
        group_means: [B] float32 mean of the finite rewards of each group, NaN for a group without any.
        group_stds: [B] float32 population std (divided by the count, not count - 1) of the finite
            rewards of each group, 0 for a group with fewer than 2 of them.
        num_zero_std_groups: number of groups whose finite rewards are all equal or fewer than 2.
        frac_reward_zero_std: num_zero_std_groups / B.
        num_nan_rewards: number of rewards that are NaN or infinite.
    """

    advantages: Tensor
    valid_mask: Tensor
    group_means: Tensor
    group_stds: Tensor
    num_zero_std_groups: int
    frac_reward_zero_std: float
    num_nan_rewards: int


@dataclass
class SurrogateResult:
    """The clipped surrogate loss and the statistics of its likelihood ratios.

    Every statistic is a detached 0-dim tensor taken over the counted elements only, so logging it
    needs one ``.item()`` and no extra device sync before that.

    Attributes:
        loss: scalar loss to minimise, with gradient to ``log_probs``.
        ratio_mean: mean ratio pi / pi_old (1.0 when nothing is counted).
        clip_fraction: share of counted elements whose clipped term is the active one in the min,
            so their gradient is zero: ratio > 1 + clip_high with A > 0, or ratio < 1 - clip_low with A < 0.
        approx_kl: mean k3 estimate of KL(pi_old || pi), (r - 1) - log r with r = pi / pi_old.
        num_counted: int64 number of counted elements (tokens at level "token", samples at "step").
    """

    loss: Tensor
    ratio_mean: Tensor
    clip_fraction: Tensor
    approx_kl: Tensor
    num_counted: Tensor


def validate_group_size(group_size: int) -> None:
    """Raise ValueError unless group_size is an integer of at least 2."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"group_size must be an integer of at least 2, got {group_size!r}")
    if group_size < 2:
        raise ValueError(
            f"GRPO needs at least 2 samples per prompt to compare them within a group, got "
            f"group_size={group_size}; set group_size to 2 or more"
        )


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale: str = "group",
    eps: float = 1e-4,
) -> AdvantageResult:
    """Compute group-relative advantages A_i = (R_i - mean_g) / (std + eps) as in GRPO.

    Statistics use the population std (divide by the count n, not n - 1) of the finite rewards of a
    group, so that groups which lost a NaN reward are scaled on the same footing as full ones.

    Args:
        rewards: [N] rewards, N = B*G with the G samples of a prompt in contiguous rows. NaN or
            infinite entries mark samples that could not be scored: they are left out of the group
            statistics, get advantage 0 and ``valid_mask`` False, and a :class:`RewardWarning`
            counts them.
        group_size: G, the number of samples per prompt (at least 2).
        scale: ``"group"`` divides by the std of the sample's own group, ``"batch"`` by the std of
            all finite rewards of the batch, ``"none"`` does not divide (A = R - mean_g).
        eps: added to the std before dividing, >= 0.

    Returns:
        An :class:`AdvantageResult`. A group whose finite rewards are all equal, or which has fewer
        than 2 of them, gets advantages of exactly 0.0 and counts as a zero-std group. When every
        group is zero-std, a :class:`RewardWarning` warns that the update cannot change the policy.
    """
    validate_group_size(group_size)
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {', '.join(ADVANTAGE_SCALES)}, got {scale!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not isinstance(rewards, Tensor) or rewards.ndim != 1:
        shape = list(rewards.shape) if isinstance(rewards, Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be a 1-D tensor [N], got {shape}")
    num_samples = rewards.shape[0]
    if num_samples == 0:
        raise ValueError("rewards is empty; pass at least one group of group_size rewards")
    if num_samples % group_size != 0:
        raise ValueError(
            f"the number of rewards ({num_samples}) is not divisible by group_size={group_size}; "
            "pass group_size samples for every prompt"
        )
    num_groups = num_samples // group_size

    # Statistics are computed in float64 so that large or nearly equal rewards keep their precision.
    values = rewards.detach().to(torch.float64).reshape(num_groups, group_size)  # [N] -> [B, G]
    finite = torch.isfinite(values)  # [B, G]
    counts = finite.sum(dim=1)  # [B]
    safe_counts = counts.clamp_min(1)

    # group statistics over the finite rewards only
    finite_values = torch.where(finite, values, 0.0)
    means = finite_values.sum(dim=1) / safe_counts  # [B]
    deviations = torch.where(finite, values - means[:, None], 0.0)  # [B, G]
    stds = (deviations.square().sum(dim=1) / safe_counts).sqrt()  # [B]

    # A group is flat when its finite rewards are exactly equal. Comparing max and min, rather than
    # the std with a threshold, also catches equal values whose computed mean is off by rounding.
    highest = torch.where(finite, values, -math.inf).amax(dim=1)
    lowest = torch.where(finite, values, math.inf).amin(dim=1)
    zero_std = (counts < 2) | (highest == lowest)  # [B]

    if scale == "group":
        advantages = deviations / (stds[:, None] + eps)
    elif scale == "batch":
        batch_values = values[finite]
        batch_std = (
            (batch_values - batch_values.mean()).square().mean().sqrt() if batch_values.numel() else 0.0
        )
        advantages = deviations / (batch_std + eps)
    else:
        advantages = deviations
    # where() also drops the 0/0 of flat groups when eps is 0
    advantages = torch.where(zero_std[:, None] | ~finite, 0.0, advantages)

    num_nan = num_samples - int(counts.sum())
    num_zero_std = int(zero_std.sum())
    if num_nan > 0:
        warnings.warn(
            f"{num_nan} of {num_samples} rewards are NaN or infinite; those samples get advantage 0, "
            "are left out of their group's mean and std, and get no gradient",
            RewardWarning,
            stacklevel=2,
        )
    if num_zero_std == num_groups:
        warnings.warn(
            f"all {num_groups} groups have zero reward std (every sample of a prompt got the same "
            "reward), so every advantage is 0 and this update cannot change the policy",
            RewardWarning,
            stacklevel=2,
        )

    group_means = torch.where(counts > 0, means, math.nan)
    group_stds = torch.where(counts >= 2, stds, 0.0)
    return AdvantageResult(
        advantages=advantages.reshape(num_samples).to(torch.float32),  # [B, G] -> [N]
        valid_mask=finite.reshape(num_samples),  # [B, G] -> [N]
        group_means=group_means.to(torch.float32),
        group_stds=group_stds.to(torch.float32),
        num_zero_std_groups=num_zero_std,
        frac_reward_zero_std=num_zero_std / num_groups,
        num_nan_rewards=num_nan,
    )


def clip_advantages(advantages: Tensor, max_abs: float | None) -> Tensor:
    """Clamp advantages [N] into [-max_abs, max_abs]; ``max_abs=None`` returns them unchanged."""
    if max_abs is None:
        return advantages
    if not (isinstance(max_abs, (int, float)) and max_abs > 0 and not math.isnan(max_abs)):
        raise ValueError(f"max_abs must be a number > 0 or None (no clipping), got {max_abs!r}")
    return advantages.clamp(-max_abs, max_abs)


def _validate_surrogate_inputs(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    clip_low: float,
    clip_high: float,
    mask: Tensor | None,
    level: str,
    sample_mask: Tensor | None,
) -> None:
    if level not in SURROGATE_LEVELS:
        raise ValueError(f"level must be one of {', '.join(SURROGATE_LEVELS)}, got {level!r}")
    if not (isinstance(clip_low, (int, float)) and 0 <= clip_low < 1):
        raise ValueError(f"clip_low must be a number in [0, 1), got {clip_low!r}")
    if not (isinstance(clip_high, (int, float)) and math.isfinite(clip_high) and clip_high >= 0):
        raise ValueError(f"clip_high must be a finite number >= 0, got {clip_high!r}")

    expected_ndim = 2 if level == "token" else 1
    expected_shape = "[N, L]" if level == "token" else "[N]"
    if log_probs.ndim != expected_ndim:
        raise ValueError(
            f"log_probs must have shape {expected_shape} at level={level!r}, got {list(log_probs.shape)}"
        )
    if old_log_probs.shape != log_probs.shape:
        raise ValueError(
            f"old_log_probs must have the shape of log_probs {list(log_probs.shape)}, got {list(old_log_probs.shape)}"
        )
    num_samples = log_probs.shape[0]
    if advantages.shape != (num_samples,):
        raise ValueError(f"advantages must have shape [{num_samples}], got {list(advantages.shape)}")
    if mask is not None and (mask.shape != log_probs.shape or mask.dtype != torch.bool):
        raise ValueError(
            f"mask must be a bool tensor of shape {list(log_probs.shape)}, got {mask.dtype} {list(mask.shape)}"
        )
    if sample_mask is not None and (sample_mask.shape != (num_samples,) or sample_mask.dtype != torch.bool):
        raise ValueError(
            f"sample_mask must be a bool tensor of shape [{num_samples}], got {sample_mask.dtype} "
            f"{list(sample_mask.shape)}"
        )


def clipped_surrogate(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    mask: Tensor | None = None,
    level: str = "token",
    sample_mask: Tensor | None = None,
) -> SurrogateResult:
    """Compute the PPO clipped surrogate loss averaged over the counted elements of the whole batch.

    Args:
        log_probs: log-probabilities under the current policy, with gradient: [N, L] per token at
            ``level="token"``, [N] per sample (already summed over its tokens) at ``level="step"``.
        old_log_probs: the same under the rollout policy, shape of ``log_probs``; detached here.
        advantages: [N] advantage of each sample, shared by all its tokens; detached here.
        clip_low: epsilon_low, the ratio is clipped from below at 1 - clip_low.
        clip_high: epsilon_high, the ratio is clipped from above at 1 + clip_high.
        mask: bool, shape of ``log_probs``, True where an element counts (at token level: the token
            was filled at this step). None counts every element.
        sample_mask: [N] bool, False for samples left out entirely, such as
            ``AdvantageResult.valid_mask`` for samples without a finite reward.

    Returns:
        A :class:`SurrogateResult`. Elements that are not counted get exactly zero gradient, even
        when their log-probabilities are -inf or NaN. With nothing counted the loss is 0.0 and
        still part of the autograd graph.
    """
    _validate_surrogate_inputs(
        log_probs, old_log_probs, advantages, clip_low, clip_high, mask, level, sample_mask
    )

    counted = torch.ones_like(log_probs, dtype=torch.bool) if mask is None else mask
    if sample_mask is not None:
        counted = counted & (sample_mask[:, None] if level == "token" else sample_mask)
    sample_advantages = advantages.detach().to(log_probs.dtype)
    if level == "token":
        sample_advantages = sample_advantages[:, None].expand_as(log_probs)  # [N] -> [N, L]

    # Mask the log-ratio before exp(), so that uncounted elements get a zero gradient rather than
    # 0 * inf = NaN, and mask advantages so a NaN there cannot reach the loss.
    log_ratio = torch.where(counted, log_probs - old_log_probs.detach(), 0.0)
    ratio = torch.exp(log_ratio)
    element_advantages = torch.where(counted, sample_advantages, 0.0)

    # L^CLIP of Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv:1707.06347),
    # negated to a loss and with separate lower and upper clip ranges:
    #   loss = -(1/|M|) * sum_{e in M} min(r_e * A_e, clip(r_e, 1 - clip_low, 1 + clip_high) * A_e)
    # where M is the set of counted elements (tokens, or samples at level "step").
    unclipped = ratio * element_advantages
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * element_advantages
    per_element_loss = -torch.minimum(unclipped, clipped)
    num_counted = counted.sum()
    denominator = num_counted.clamp_min(1).to(log_probs.dtype)
    loss = (per_element_loss * counted).sum() / denominator

    with torch.no_grad():
        is_clipped = ((ratio > 1.0 + clip_high) & (element_advantages > 0)) | (
            (ratio < 1.0 - clip_low) & (element_advantages < 0)
        )
        clip_fraction = (is_clipped & counted).sum() / denominator
        ratio_sum = torch.where(counted, ratio, 0.0).sum()
        ratio_mean = torch.where(num_counted > 0, ratio_sum / denominator, torch.ones_like(ratio_sum))
        approx_kl = torch.where(counted, torch.expm1(log_ratio) - log_ratio, 0.0).sum() / denominator

    return SurrogateResult(
        loss=loss,
        ratio_mean=ratio_mean,
        clip_fraction=clip_fraction,
        approx_kl=approx_kl,
        num_counted=num_counted,
    )


def kl_k3(log_probs: Tensor, ref_log_probs: Tensor, mask: Tensor | None = None) -> Tensor:
    """Compute the per-element k3 estimate of KL(pi || pi_ref) for samples drawn from pi.

    k3 = exp(ref - lp) - (ref - lp) - 1, from J. Schulman, "Approximating KL Divergence" (2020),
    with r = pi_ref / pi. It is >= 0 and unbiased. It is written as expm1(x) - x, which rounds to
    a value >= 0 even when x is tiny.

    Args:
        log_probs: log pi of the sampled elements, any shape (e.g. [N, L] or [N]), with gradient.
        ref_log_probs: log pi_ref of the same elements, same shape; detached here.
        mask: optional bool tensor of the same shape, True where the element counts. Elsewhere the
            result is 0.0 with zero gradient, even for -inf log-probabilities.

    Returns:
        A tensor of the shape of ``log_probs``. Average it with :func:`masked_mean`.
    """
    if ref_log_probs.shape != log_probs.shape:
        raise ValueError(
            f"ref_log_probs must have the shape of log_probs {list(log_probs.shape)}, got {list(ref_log_probs.shape)}"
        )
    if mask is not None and (mask.shape != log_probs.shape or mask.dtype != torch.bool):
        raise ValueError(
            f"mask must be a bool tensor of shape {list(log_probs.shape)}, got {mask.dtype} {list(mask.shape)}"
        )
    log_ratio = ref_log_probs.detach() - log_probs
    if mask is not None:
        log_ratio = torch.where(mask, log_ratio, 0.0)
    return torch.expm1(log_ratio) - log_ratio


def masked_mean(values: Tensor, mask: Tensor | None = None, dim: int | None = None) -> Tensor:
    """Average values over the elements where mask is True (all elements when mask is None).

    Args:
        values: any shape.
        mask: bool, shape of ``values``, True where an element counts.
        dim: reduce only this dimension; None reduces all.

    Returns:
        The mean, 0.0 where nothing is counted. Masked elements get zero gradient through the mean.
    """
    if mask is None:
        return values.mean() if dim is None else values.mean(dim=dim)
    if mask.shape != values.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a bool tensor of shape {list(values.shape)}, got {mask.dtype} {list(mask.shape)}"
        )
    kept = torch.where(mask, values, 0.0)
    if dim is None:
        return kept.sum() / mask.sum().clamp_min(1)
    return kept.sum(dim=dim) / mask.sum(dim=dim).clamp_min(1)
