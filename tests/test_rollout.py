"""Tests of the rollout, the trajectory record and the replay of log-probs for training."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import RandomMDM, RecordingMDM, ScriptedPolicy, knob_table, linear_ratios
from torch import Tensor, nn

from cogrpo_lightning.sampling import Trajectory, prepare_conditions, recompute_log_probs, rollout
from cogrpo_lightning.schedule import PredefinedSchedule, SchedulePolicy
from cogrpo_lightning.schedule.knobs import CFG_SCALE, NUM_KNOBS

PROMPTS = ["a red circle", "two blue squares", "a green cross above a yellow triangle"]


def real_policy(num_steps: int, cfg_scale: float, **kwargs) -> SchedulePolicy:
    """Build a SchedulePolicy around tau_s = 0.7 and `cfg_scale`. A CFG scale of 1 is frozen, so w == 1 exactly."""
    predefined = PredefinedSchedule(remask_ratio="cosine", sampling_temperature=0.7, cfg_scale=cfg_scale)
    frozen = () if cfg_scale != 1.0 else ("cfg_scale",)
    return SchedulePolicy(num_steps, predefined=predefined, frozen_knobs=frozen, init_std=0.3, **kwargs)


# ---------------------------------------------------------------- rollout and replay


@pytest.mark.parametrize(("num_prompts", "group_size"), [(1, 1), (2, 4)])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_ratio_is_one_before_update(num_prompts, group_size, cfg_scale):
    torch.manual_seed(0)
    model = RandomMDM(num_tokens=16, codebook_size=32).eval()
    num_steps = 6
    policy = real_policy(num_steps, cfg_scale)
    prompts = PROMPTS[:num_prompts]
    condition, negative = prepare_conditions(model, prompts, group_size, negative_prompt="blurry")
    generator = torch.Generator().manual_seed(6)

    trajectory = rollout(
        model,
        policy,
        prompts,
        group_size,
        num_steps,
        generator=generator,
        condition=condition,
        negative_condition=negative,
    )

    assert trajectory.num_samples == num_prompts * group_size
    assert bool((trajectory.knobs[:, :, 1] != 1.0).all())
    assert guidance_steps(trajectory) == ([True] * num_steps if cfg_scale != 1.0 else [False] * num_steps)
    for step in range(num_steps):
        token_log_probs, fill_mask, schedule_log_probs = recompute_log_probs(
            model, trajectory, step, condition, negative, policy
        )
        assert torch.equal(fill_mask, trajectory.fill_mask(step))
        token_ratio = torch.exp(token_log_probs - trajectory.old_token_log_probs_at(step))
        schedule_ratio = torch.exp(schedule_log_probs - trajectory.old_schedule_log_probs[step])
        assert float((token_ratio.detach() - 1).abs().max()) <= 1e-5
        assert float((schedule_ratio.detach() - 1).abs().max()) <= 1e-5

    token_log_probs[fill_mask].sum().backward()
    assert model.head_weight.grad is not None
    assert float(model.head_weight.grad.abs().sum()) > 0


def guidance_steps(trajectory: Trajectory) -> list[bool]:
    return [bool((trajectory.knobs[t, :, CFG_SCALE] != 1).any()) for t in range(trajectory.num_steps)]


def test_ratio_is_one_with_feature_policy():
    model = RecordingMDM(num_tokens=16, codebook_size=32, with_features=True).eval()
    num_steps = 4
    policy = real_policy(
        num_steps, 2.0, head="state", feature_dim=model.feature_dim, condition_dim=model.condition_dim
    )
    # The state head starts at the predefined schedule. A nonzero last layer makes it read the state.
    nn.init.normal_(policy.state_net[-1].weight, std=0.5)
    condition, negative = prepare_conditions(model, PROMPTS[:2], 2)
    trajectory = rollout(
        model,
        policy,
        PROMPTS[:2],
        2,
        num_steps,
        generator=torch.Generator().manual_seed(7),
        condition=condition,
        negative_condition=negative,
    )

    assert trajectory.features is not None
    assert trajectory.features.shape == (num_steps, 4, model.hidden_size)
    # A feature policy needs the conditional pass before it outputs w: two forwards of N rows per step.
    assert [len(call.token_ids) for call in model.calls] == [4] * (2 * num_steps)
    for step in range(num_steps):
        token_log_probs, _, schedule_log_probs = recompute_log_probs(
            model, trajectory, step, condition, negative, policy
        )
        assert torch.equal(token_log_probs.detach(), trajectory.old_token_log_probs_at(step))
        assert torch.equal(schedule_log_probs.detach(), trajectory.old_schedule_log_probs[step])


def test_feature_policy_needs_model_features():
    model = RandomMDM(num_tokens=16, codebook_size=32, with_features=False).eval()
    policy = real_policy(2, 2.0, head="state", feature_dim=16)
    with pytest.raises(ValueError, match="forward_with_features returned None"):
        rollout(model, policy, ["x"], 1, 2)


def test_negative_prompt_expanded_once():
    model = RecordingMDM(num_tokens=16, codebook_size=32).eval()
    cfg_scales = [3.0, 1.0, 2.0, 1.0]
    table = knob_table(4, linear_ratios(4), 0.8, 1.0, cfg_scales)
    policy = ScriptedPolicy(table)

    condition, negative = prepare_conditions(model, PROMPTS, 4, negative_prompt="blurry low quality")
    assert model.num_encode_prompts_calls == 1
    assert model.num_encode_negative_calls == 1
    assert len(condition) == 12
    assert len(negative) == 12
    assert negative.hidden.stride(0) == 0  # broadcast view of the one encoded row

    trajectory = rollout(model, policy, PROMPTS, 4, 4, condition=condition, negative_condition=negative)
    rollout_rows = [len(call.token_ids) for call in model.calls]
    model.calls.clear()
    for step in range(4):
        recompute_log_probs(model, trajectory, step, condition, negative, policy)
    replay_rows = [len(call.token_ids) for call in model.calls]

    # Guided steps run one forward over the stacked [cond; uncond] rows, the others over N rows.
    assert rollout_rows == [24, 12, 24, 12]
    assert replay_rows == rollout_rows
    assert model.num_encode_negative_calls == 1
    guided = model.calls[0].condition
    torch.testing.assert_close(guided.pooled[12:], negative.pooled)
    torch.testing.assert_close(guided.pooled[:12], condition.pooled)


def test_different_text_lengths_use_two_forwards():
    # Prompt and negative conditions with different K cannot be stacked, so guided steps run the
    # conditional and the unconditional forward separately, in rollout and replay alike.
    model = RecordingMDM(num_tokens=16, codebook_size=32, max_text_tokens=None).eval()
    table = knob_table(3, linear_ratios(3), 0.8, 1.0, [2.0, 1.0, 2.0])
    policy = ScriptedPolicy(table)
    condition, negative = prepare_conditions(model, PROMPTS, 2, negative_prompt="blurry")
    assert condition.hidden.shape[1] != negative.hidden.shape[1]

    trajectory = rollout(model, policy, PROMPTS, 2, 3, condition=condition, negative_condition=negative)
    rollout_conditions = [call.condition for call in model.calls]
    model.calls.clear()
    for step in range(3):
        token_log_probs, _, _ = recompute_log_probs(model, trajectory, step, condition, negative, policy)
        assert torch.equal(token_log_probs, trajectory.old_token_log_probs_at(step))
    replay_conditions = [call.condition for call in model.calls]

    expected = [condition, negative, condition, condition, negative]
    assert [c is e for c, e in zip(rollout_conditions, expected, strict=True)] == [True] * 5
    assert [c is e for c, e in zip(replay_conditions, expected, strict=True)] == [True] * 5


def test_rollout_encodes_prompts_itself():
    model = RecordingMDM(num_tokens=16, codebook_size=32).eval()
    table = knob_table(3, linear_ratios(3), 1.0, 1.0, 2.0)
    trajectory = rollout(model, ScriptedPolicy(table), PROMPTS, 4, 3, negative_prompt="blurry")
    assert model.num_encode_prompts_calls == 1
    assert model.num_encode_negative_calls == 1
    assert trajectory.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert trajectory.group_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert trajectory.images is not None
    assert trajectory.images.shape == (12, 3, 4, 4)


def test_recompute_requires_uncond_for_guided_step():
    model = RandomMDM(num_tokens=16, codebook_size=32).eval()
    table = knob_table(2, linear_ratios(2), 1.0, 1.0, 2.0)
    trajectory = rollout(model, ScriptedPolicy(table), ["x"], 2, 2)
    condition, _ = prepare_conditions(model, ["x"], 2)
    with pytest.raises(ValueError, match="uncond_condition is None"):
        recompute_log_probs(model, trajectory, 0, condition, None)


def test_prepare_conditions_rejects_bad_input():
    model = RandomMDM()
    with pytest.raises(ValueError, match="group_size"):
        prepare_conditions(model, ["x"], 0)
    with pytest.raises(ValueError, match="single string"):
        prepare_conditions(model, "a red circle", 2)
    with pytest.raises(ValueError, match="rows"):
        prepare_conditions(model, ["x", "y"], 2, condition=model.encode_prompts(["x", "y", "z"]))


# ---------------------------------------------------------------- trajectory record


def test_token_ids_before_matches_rollout_canvas():
    model = RecordingMDM(num_tokens=16, codebook_size=32).eval()
    table = knob_table(5, linear_ratios(5), 0.9, 1.0, 1.0)
    trajectory = rollout(
        model, ScriptedPolicy(table), PROMPTS[:2], 3, 5, generator=torch.Generator().manual_seed(8)
    )

    assert len(model.calls) == 5
    for step, call in enumerate(model.calls):
        assert torch.equal(trajectory.token_ids_before(step), call.token_ids)
    assert torch.equal(trajectory.token_ids_before(5), trajectory.final_ids.long())
    assert bool((trajectory.token_ids_before(0) == model.mask_token_id).all())


def test_trajectory_stores_no_codebook_dimension():
    codebook_size = 97  # no other dimension of the rollout is 97
    model = RandomMDM(num_tokens=16, codebook_size=codebook_size, with_features=True).eval()
    policy = real_policy(6, 2.0, head="state", feature_dim=model.feature_dim)
    trajectory = rollout(model, policy, PROMPTS, 2, 6, decode_images=False)

    for field in dataclasses.fields(trajectory):
        value = getattr(trajectory, field.name)
        if isinstance(value, Tensor) and value.is_floating_point():
            assert codebook_size not in value.shape, field.name
    assert trajectory.final_ids.dtype == torch.int32
    assert trajectory.fill_step.dtype == torch.int16
    token_bytes = sum(
        t.element_size() * t.numel()
        for t in (trajectory.final_ids, trajectory.fill_step, trajectory.old_token_log_probs)
    )
    assert token_bytes == 10 * 6 * 16


def test_rollout_same_seed_identical():
    model = RandomMDM(num_tokens=16, codebook_size=32).eval()
    policy = real_policy(5, 2.0)

    def run(seed: int) -> Trajectory:
        return rollout(model, policy, PROMPTS[:2], 3, 5, generator=torch.Generator().manual_seed(seed))

    first, second, other = run(11), run(11), run(12)
    for field in dataclasses.fields(Trajectory):
        a, b = getattr(first, field.name), getattr(second, field.name)
        if isinstance(a, Tensor):
            assert torch.equal(a, b), field.name
        else:
            assert a == b, field.name
    assert not torch.equal(first.final_ids, other.final_ids)
    assert not torch.equal(first.actions, other.actions)


def test_deterministic_schedule_uses_mean_action():
    model = RandomMDM(num_tokens=16, codebook_size=32).eval()
    policy = real_policy(4, 2.0)
    trajectory = rollout(model, policy, ["x"], 3, 4, deterministic_schedule=True)
    assert bool((trajectory.actions == 0).all())  # the mean action of a fresh policy is 0
    expected_knobs = policy.predefined.values(4)
    for step in range(4):
        torch.testing.assert_close(trajectory.knobs[step], expected_knobs[step].expand(3, NUM_KNOBS))


def test_trajectory_select_and_to():
    model = RandomMDM(num_tokens=16, codebook_size=32).eval()
    trajectory = rollout(model, real_policy(3, 2.0), PROMPTS, 2, 3)
    trajectory.rewards = torch.arange(6, dtype=torch.float32)

    subset = trajectory.select(torch.tensor([1, 4]))
    moved = subset.to("cpu")

    assert subset.num_samples == 2
    assert subset.actions.shape == (3, 2, NUM_KNOBS)
    assert subset.old_schedule_log_probs.shape == (3, 2)
    assert subset.rewards.tolist() == [1.0, 4.0]
    assert subset.prompt_index.tolist() == [0, 2]
    assert torch.equal(moved.final_ids, trajectory.final_ids[[1, 4]])


def test_trajectory_rejects_wrong_shapes():
    model = RandomMDM(num_tokens=16, codebook_size=32).eval()
    trajectory = rollout(model, real_policy(3, 2.0), ["x"], 2, 3)
    with pytest.raises(ValueError, match="old_schedule_log_probs"):
        dataclasses.replace(trajectory, old_schedule_log_probs=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="rewards"):
        dataclasses.replace(trajectory, rewards=torch.zeros(3))
    with pytest.raises(IndexError):
        trajectory.fill_mask(3)
