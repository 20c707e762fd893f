"""The Co-GRPO rollout of a masked diffusion model (MDM) and the replay of its log-probs.

The per-step sampler lives in :mod:`cogrpo_lightning.masked_sampler` and is re-exported here.

Shape legend of the package, written in brackets (``[N, L]``) on every tensor argument:

- B: prompts in a batch
- G: samples per prompt (group size)
- N = B * G: samples, where rows b*G .. b*G+G-1 belong to prompt b
- L: image tokens (the h * w latent grid)
- V: codebook size
- T: sampling steps
- K: text tokens
- D: hidden size (E: size of the pooled text embedding, F: size of pooled model features)
- S = 4: schedule knobs in the order of :data:`cogrpo_lightning.schedule.knobs.KNOB_NAMES`:
  re-mask ratio r, sampling temperature tau_s, re-mask temperature tau_r, CFG scale w

Generation starts from an all-mask canvas. At each step the sampler draws a token at every masked
position from ``log_softmax((uncond + w * (cond - uncond)) / tau_s)``, scores each draw by its
log-prob plus ``tau_r`` times Gumbel noise, and keeps the ``floor(L * r)`` least confident draws
masked. Tokens already committed are never drawn again, and the last step fills every position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from cogrpo_lightning.masked_sampler import (
    LOG_PROB_FLOOR,
    MIN_SAMPLING_TEMPERATURE,
    MaskedSampler,
    SamplerStepOutput,
    guidance_needed,
    num_masked_after_step,
    sampling_log_probs,
)
from cogrpo_lightning.mdm.base import Condition, MaskedDiffusionModel
from cogrpo_lightning.schedule.knobs import CFG_SCALE, NUM_KNOBS, SAMPLING_TEMPERATURE
from cogrpo_lightning.trajectory import Trajectory, fill_step_dtype

__all__ = [
    "LOG_PROB_FLOOR",
    "MIN_SAMPLING_TEMPERATURE",
    "MaskedSampler",
    "SamplerStepOutput",
    "SchedulePolicyProtocol",
    "Trajectory",
    "guidance_needed",
    "num_masked_after_step",
    "prepare_conditions",
    "recompute_log_probs",
    "rollout",
    "sampling_log_probs",
]


class SchedulePolicyProtocol(Protocol):
    """The schedule-policy methods that :func:`rollout` and :func:`recompute_log_probs` call.

    Actions are the policy's raw outputs [N, S]. :meth:`knob_values` maps them to the knob values
    (r, tau_s, tau_r, w) that the sampler uses.
    """

    @property
    def uses_features(self) -> bool: ...

    def sample(
        self,
        step_index: int,
        num_steps: int,
        num_samples: int,
        features: Tensor | None = None,
        prompt_embedding: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor: ...

    def mean_action(
        self,
        step_index: int,
        num_steps: int,
        num_samples: int,
        features: Tensor | None = None,
        prompt_embedding: Tensor | None = None,
    ) -> Tensor: ...

    def log_prob(
        self,
        actions: Tensor,
        step_index: int,
        num_steps: int,
        features: Tensor | None = None,
        prompt_embedding: Tensor | None = None,
    ) -> Tensor: ...

    def knob_values(self, actions: Tensor, step_index: int, num_steps: int) -> Tensor: ...


def prepare_conditions(
    model: MaskedDiffusionModel,
    prompts: Sequence[str],
    group_size: int,
    *,
    negative_prompt: str = "",
    condition: Condition | None = None,
    negative_condition: Condition | None = None,
) -> tuple[Condition, Condition]:
    """Build the prompt and unconditional conditions of a rollout, N = B * G rows each.

    The prompt condition is encoded once and repeated G times per prompt, so rows b*G .. b*G+G-1
    belong to prompt b. The unconditional condition is encoded once as one row and broadcast to N
    rows without a copy. Pass the result to both :func:`rollout` and :func:`recompute_log_probs`
    so that the rollout and the likelihood see the same conditions.

    Args:
        model: the MDM that encodes the prompts.
        prompts: B prompt strings.
        group_size: G, samples per prompt.
        negative_prompt: text of the unconditional condition, used when `negative_condition` is None.
        condition: an already encoded prompt condition with B rows (repeated here) or N rows (used
            as is). None encodes `prompts`.
        negative_condition: an already encoded unconditional condition with 1 row (broadcast
            here) or N rows (used as is). None encodes `negative_prompt`.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty sequence of strings, not a single string")
    num_prompts = len(prompts)
    num_samples = num_prompts * group_size

    if condition is None:
        condition = model.encode_prompts(list(prompts))
    if len(condition) == num_prompts:
        condition = condition.repeat_interleave(group_size)
    elif len(condition) != num_samples:
        raise ValueError(
            f"condition must have {num_prompts} rows (one per prompt) or {num_samples} rows "
            f"(prompts x group_size), got {len(condition)}"
        )

    if negative_condition is None:
        negative_condition = model.encode_negative(negative_prompt)
    if len(negative_condition) == 1:
        negative_condition = negative_condition.expand_to(num_samples)
    elif len(negative_condition) != num_samples:
        raise ValueError(
            f"negative_condition must have 1 or {num_samples} rows, got {len(negative_condition)}"
        )
    return condition, negative_condition


def _concatenate_conditions(first: Condition, second: Condition) -> Condition | None:
    """Stack two conditions along the batch, or return None when their text shapes or dtypes differ."""
    if first.hidden.shape[1:] != second.hidden.shape[1:] or first.mask.shape[1:] != second.mask.shape[1:]:
        return None
    if first.hidden.dtype != second.hidden.dtype or first.pooled.shape[1:] != second.pooled.shape[1:]:
        return None
    return Condition(
        torch.cat([first.hidden, second.hidden]),
        torch.cat([first.mask, second.mask]),
        torch.cat([first.pooled, second.pooled]),
    )


def _predict(
    model: MaskedDiffusionModel,
    token_ids: Tensor,
    condition: Condition,
    negative_condition: Condition | None,
    guided_condition: Condition | None,
    guidance: bool,
    cond_log_probs: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """Run the model passes of one step that have not run yet: cond and uncond log-probs [N, L, V].

    `cond_log_probs` is given when a feature-based policy needed the conditional pass before it
    could output w, so only the unconditional pass can remain. Otherwise a guided step runs one
    forward over the 2N rows [cond; uncond] when `guided_condition` (both conditions stacked) is
    given. On a 2-core CPU shared with other jobs, with TinyMDM (hidden size 128 and 384, N = 8
    and 32, best of 8 runs), that forward took about 0.7 of the time of two N-row forwards.
    Rollout and replay call this function with the same arguments, so their log-probs match bit
    for bit.
    """
    if guidance and negative_condition is None:
        raise ValueError("classifier-free guidance needs the unconditional condition, got None")
    if cond_log_probs is not None:
        uncond_log_probs = model(token_ids, negative_condition) if guidance else None
        return cond_log_probs, uncond_log_probs
    if not guidance:
        return model(token_ids, condition), None
    if guided_condition is None:
        return model(token_ids, condition), model(token_ids, negative_condition)
    num_samples = token_ids.shape[0]
    log_probs = model(torch.cat([token_ids, token_ids]), guided_condition)
    return log_probs[:num_samples], log_probs[num_samples:]


@torch.no_grad()
def rollout(
    model: MaskedDiffusionModel,
    policy: SchedulePolicyProtocol,
    prompts: Sequence[str],
    group_size: int,
    num_steps: int,
    *,
    negative_prompt: str = "",
    deterministic_schedule: bool = False,
    generator: torch.Generator | None = None,
    condition: Condition | None = None,
    negative_condition: Condition | None = None,
    sampler: MaskedSampler | None = None,
    decode_images: bool = True,
) -> Trajectory:
    """Generate G samples per prompt over T steps and record what the GRPO update needs.

    At each step the model predicts the canvas under the prompt condition. The policy then picks
    the schedule action from the pooled features of the canvas (if it uses features) and the
    pooled prompt embedding. The unconditional pass runs only when some sample's CFG scale
    differs from 1. Without features it shares one forward with the conditional pass over the
    stacked 2N rows. A feature-based policy needs the conditional pass before it outputs w, so
    there the unconditional pass runs alone. Put the model in eval mode (no dropout), or the
    importance ratio before the first update is not 1.

    Args:
        model: the MDM to sample from.
        policy: the schedule policy. Its actions are drawn at random, or set to the mean when
            `deterministic_schedule` is True (for evaluation).
        prompts: B prompt strings.
        group_size: G, samples per prompt.
        num_steps: T, the number of sampling steps. T > L is allowed: the steps after the canvas
            is full fill nothing.
        negative_prompt: text of the unconditional condition for CFG.
        deterministic_schedule: use the policy's mean action instead of a random draw.
        generator: random generator on the model's device, for actions, tokens and noise.
        condition, negative_condition: already encoded conditions, see :func:`prepare_conditions`.
        sampler: the sampler to use; None builds ``MaskedSampler(model.mask_token_id)``.
        decode_images: decode the final canvas into ``Trajectory.images``.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    condition, negative_condition = prepare_conditions(
        model,
        prompts,
        group_size,
        negative_prompt=negative_prompt,
        condition=condition,
        negative_condition=negative_condition,
    )
    if sampler is None:
        sampler = MaskedSampler(model.mask_token_id)
    device = condition.pooled.device
    num_samples = len(condition)
    num_tokens = model.num_tokens
    uses_features = policy.uses_features

    token_ids = torch.full((num_samples, num_tokens), model.mask_token_id, dtype=torch.long, device=device)
    # num_steps marks "not filled yet"; the final check below asserts that no position keeps it.
    fill_step = torch.full_like(token_ids, num_steps, dtype=fill_step_dtype(num_steps))
    old_token_log_probs = torch.zeros(num_samples, num_tokens, dtype=torch.float32, device=device)
    actions = torch.zeros(num_steps, num_samples, NUM_KNOBS, dtype=torch.float32, device=device)
    knobs = torch.zeros_like(actions)
    schedule_log_probs = torch.zeros(num_steps, num_samples, dtype=torch.float32, device=device)
    step_features: list[Tensor] = []

    guided_condition: Condition | None = None

    for step_index in range(num_steps):
        cond_log_probs = features = None
        if uses_features:
            cond_log_probs, features = model.forward_with_features(token_ids, condition)
            if features is None:
                raise ValueError(
                    f"the schedule policy uses features but {type(model).__name__}.forward_with_features "
                    "returned None; use a policy without features or a model that offers them"
                )
            step_features.append(features.float())
        policy_inputs = {"features": features, "prompt_embedding": condition.pooled}
        if deterministic_schedule:
            action = policy.mean_action(step_index, num_steps, num_samples, **policy_inputs)
        else:
            action = policy.sample(step_index, num_steps, num_samples, generator=generator, **policy_inputs)
        schedule_log_probs[step_index] = policy.log_prob(action, step_index, num_steps, **policy_inputs)
        step_knobs = policy.knob_values(action, step_index, num_steps).float()
        actions[step_index] = action
        knobs[step_index] = step_knobs

        guidance = guidance_needed(step_knobs[:, CFG_SCALE])
        if guidance and not uses_features and guided_condition is None:
            guided_condition = _concatenate_conditions(condition, negative_condition)
        cond_log_probs, uncond_log_probs = _predict(
            model, token_ids, condition, negative_condition, guided_condition, guidance, cond_log_probs
        )

        output = sampler.step(
            token_ids, cond_log_probs, uncond_log_probs, step_knobs, step_index, num_steps, generator
        )
        fill_step[output.fill_mask] = step_index
        old_token_log_probs = torch.where(output.fill_mask, output.token_log_probs, old_token_log_probs)
        token_ids = output.next_ids

    if bool((token_ids == model.mask_token_id).any()):
        raise RuntimeError("rollout finished with masked tokens left; the sampler's last step must fill all")
    prompt_index = torch.arange(len(prompts), device=device).repeat_interleave(group_size)
    group_index = prompt_index.clone()
    images = model.decode(token_ids) if decode_images else None
    return Trajectory(
        final_ids=token_ids.to(torch.int32),
        fill_step=fill_step,
        actions=actions,
        knobs=knobs,
        old_token_log_probs=old_token_log_probs,
        old_schedule_log_probs=schedule_log_probs,
        features=torch.stack(step_features) if uses_features else None,
        prompt_index=prompt_index,
        group_index=group_index,
        num_steps=num_steps,
        mask_token_id=model.mask_token_id,
        images=images,
    )


def recompute_log_probs(
    model: MaskedDiffusionModel,
    trajectory: Trajectory,
    step_index: int,
    condition: Condition,
    uncond_condition: Condition | None,
    policy: SchedulePolicyProtocol | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Recompute with the current parameters the log-probs of what the rollout did at one step.

    The token log-probs use the knob values the rollout used (``trajectory.knobs``, which the
    rollout computed with ``policy.knob_values``) and the same CFG rule: the unconditional pass
    runs when some w differs from 1. The schedule log-probs use the stored actions and features.

    Args:
        model: the MDM being trained.
        trajectory: the rollout record with N samples.
        step_index: index t of the step, in [0, T).
        condition: the prompt condition with N rows, as built by :func:`prepare_conditions`.
        uncond_condition: the unconditional condition with 1 or N rows; required when the step
            used guidance.
        policy: the schedule policy; None skips the schedule log-probs.

    Returns:
        token_log_probs: [N, L] float32 log-probs of the tokens filled at this step, 0 elsewhere,
            with autograd history.
        fill_mask: [N, L] bool, True at positions filled at this step.
        schedule_log_probs: [N] policy log-probs of the stored actions, or None without a policy.
    """
    num_samples = trajectory.num_samples
    num_steps = trajectory.num_steps
    if not 0 <= step_index < num_steps:
        raise ValueError(f"step_index must be in [0, {num_steps - 1}], got {step_index}")
    if len(condition) != num_samples:
        raise ValueError(
            f"condition must have {num_samples} rows like the trajectory, got {len(condition)}; "
            "build it with prepare_conditions"
        )

    token_ids = trajectory.token_ids_before(step_index)
    fill_mask = trajectory.fill_mask(step_index)
    step_knobs = trajectory.knobs[step_index]
    with_features = trajectory.features is not None
    cond_log_probs = None
    if with_features:
        cond_log_probs, _ = model.forward_with_features(token_ids, condition)

    guidance = guidance_needed(step_knobs[:, CFG_SCALE])
    guided_condition = None
    if guidance:
        if uncond_condition is None:
            raise ValueError(
                f"step {step_index} of the rollout used CFG but uncond_condition is None; "
                "pass the unconditional condition from prepare_conditions"
            )
        if len(uncond_condition) == 1:
            uncond_condition = uncond_condition.expand_to(num_samples)
        if not with_features:
            guided_condition = _concatenate_conditions(condition, uncond_condition)
    cond_log_probs, uncond_log_probs = _predict(
        model,
        token_ids,
        condition,
        uncond_condition,
        guided_condition,
        guidance,
        cond_log_probs,
    )

    log_probs = sampling_log_probs(
        cond_log_probs, uncond_log_probs, step_knobs[:, CFG_SCALE], step_knobs[:, SAMPLING_TEMPERATURE]
    )
    final_ids = trajectory.final_ids.long().unsqueeze(-1)
    token_log_probs = log_probs.gather(-1, final_ids).squeeze(-1)
    token_log_probs = torch.where(fill_mask, token_log_probs, torch.zeros_like(token_log_probs))

    schedule_log_probs = None
    if policy is not None:
        features = trajectory.features[step_index] if trajectory.features is not None else None
        if policy.uses_features and features is None:
            raise ValueError("the schedule policy uses features but the trajectory stored none")
        schedule_log_probs = policy.log_prob(
            trajectory.actions[step_index],
            step_index,
            num_steps,
            features=features,
            prompt_embedding=condition.pooled,
        )
    return token_log_probs, fill_mask, schedule_log_probs
