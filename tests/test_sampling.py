"""Tests of the masked sampler: the counting rule, the sampling distribution and single steps."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import RandomMDM, RecordingMDM, ScriptedPolicy, fill_counts, knob_table, linear_ratios

from cogrpo_lightning.sampling import (
    MaskedSampler,
    num_masked_after_step,
    prepare_conditions,
    recompute_log_probs,
    rollout,
    sampling_log_probs,
)

# ---------------------------------------------------------------- counting rule


@pytest.mark.parametrize(
    ("num_masked", "ratio", "step", "num_steps", "min_tokens", "expected"),
    [
        (16, 0.5, 0, 4, 1, 8),  # floor(16 * 0.5)
        (16, 0.3, 0, 4, 1, 4),  # floor(4.8)
        (16, 1.0, 0, 4, 1, 15),  # clamped so that at least one token is filled
        (4, 0.9, 1, 4, 1, 3),  # floor(14.4) = 14 > 4 - 1 masked
        (1, 0.9, 2, 4, 1, 0),  # the last masked token is filled
        (0, 0.9, 2, 4, 1, 0),  # nothing left
        (16, 0.0, 0, 4, 1, 0),
        (16, -0.2, 0, 4, 1, 0),  # ratio below 0 is clamped
        (16, 1.7, 0, 4, 1, 15),  # ratio above 1 is clamped
        (16, 0.9, 3, 4, 1, 0),  # the last step keeps nothing masked
        (16, 0.9, 0, 1, 1, 0),  # a single step is the last step
        (16, 0.9, 0, 4, 3, 13),  # min_tokens_per_step = 3: min(14, 16 - 3)
        (2, 0.9, 0, 4, 3, 0),  # fewer masked than min_tokens_per_step: fill all
    ],
)
def test_count_rule_hand_values(num_masked, ratio, step, num_steps, min_tokens, expected):
    result = num_masked_after_step(
        torch.tensor([num_masked]), torch.tensor([ratio]), 16, step, num_steps, min_tokens
    )
    assert result.dtype == torch.int64
    assert result.tolist() == [expected]


def test_count_rule_per_sample():
    num_masked = torch.tensor([16, 16, 8, 3, 0])
    ratio = torch.tensor([0.5, 0.25, 0.75, 0.5, 0.5])
    result = num_masked_after_step(num_masked, ratio, 16, 1, 8)
    assert result.tolist() == [8, 4, 7, 2, 0]


def test_count_rule_float32_ratio_rounding():
    # float32(0.7) * 10 = 6.99999988; the tolerance makes it keep 7, as written.
    ratio = torch.tensor([0.7], dtype=torch.float32)
    result = num_masked_after_step(torch.tensor([10]), ratio, 10, 0, 4)
    assert result.tolist() == [7]


def test_count_rule_rejects_bad_step():
    with pytest.raises(ValueError, match="step_index"):
        num_masked_after_step(torch.tensor([4]), torch.tensor([0.5]), 16, 4, 4)


# ---------------------------------------------------------------- sampling distribution


def test_guided_tempered_log_probs_hand_values():
    # One position, V = 3. uncond + 3 * (cond - uncond) = 3 * cond - 2 * uncond, so the guided
    # weights are p_cond^3 / p_uncond^2 = 3.125, 0.3, 0.032. Temperature 0.5 squares them.
    cond = torch.tensor([0.5, 0.3, 0.2]).log().view(1, 1, 3)
    uncond = torch.tensor([0.2, 0.3, 0.5]).log().view(1, 1, 3)
    weights = [3.125**2, 0.3**2, 0.032**2]
    expected = torch.tensor([math.log(w / sum(weights)) for w in weights])

    result = sampling_log_probs(cond, uncond, torch.tensor([3.0]), torch.tensor([0.5]))

    assert result.dtype == torch.float32
    torch.testing.assert_close(result.view(3), expected, rtol=0, atol=1e-6)


def test_step_stores_guided_log_probs():
    cond = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]).log().view(1, 2, 3)
    uncond = torch.tensor([[0.2, 0.3, 0.5], [0.3, 0.3, 0.4]]).log().view(1, 2, 3)
    expected = torch.log_softmax((uncond + 3.0 * (cond - uncond)) / 0.5, dim=-1)
    knobs = torch.tensor([[0.0, 0.5, 0.0, 3.0]])
    sampler = MaskedSampler(mask_token_id=3)
    generator = torch.Generator().manual_seed(0)

    output = sampler.step(torch.tensor([[3, 3]]), cond, uncond, knobs, 0, 1, generator)

    assert output.fill_mask.tolist() == [[True, True]]
    drawn = output.next_ids[0]
    for position in range(2):
        value = float(output.token_log_probs[0, position])
        assert value == pytest.approx(float(expected[0, position, drawn[position]]), abs=1e-6)


def test_rollout_stores_guided_log_probs():
    model = RecordingMDM(num_tokens=6, codebook_size=5).eval()
    num_steps = 3
    table = knob_table(num_steps, linear_ratios(num_steps), 0.5, 1.0, 3.0)
    generator = torch.Generator().manual_seed(1)
    trajectory = rollout(model, ScriptedPolicy(table), ["a cat"], 2, num_steps, generator=generator)

    condition, negative = prepare_conditions(model, ["a cat"], 2)
    for step in range(num_steps):
        token_ids = trajectory.token_ids_before(step)
        with torch.no_grad():
            cond, uncond = model(token_ids, condition), model(token_ids, negative)
        expected = torch.log_softmax((uncond + 3.0 * (cond - uncond)) / 0.5, dim=-1)
        expected = expected.gather(-1, trajectory.final_ids.long().unsqueeze(-1)).squeeze(-1)
        fill_mask = trajectory.fill_mask(step)
        stored = trajectory.old_token_log_probs[fill_mask]
        torch.testing.assert_close(stored, expected[fill_mask], rtol=0, atol=1e-5)


def test_bf16_large_codebook_stays_finite():
    model = RandomMDM(num_tokens=16, codebook_size=8192, logit_scale=20.0, output_dtype=torch.bfloat16).eval()
    num_steps = 4
    table = knob_table(num_steps, linear_ratios(num_steps), 0.05, 1.0, 3.0)
    policy = ScriptedPolicy(table)
    generator = torch.Generator().manual_seed(2)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        trajectory = rollout(model, policy, ["a red circle"], 2, num_steps, generator=generator)
        condition, negative = prepare_conditions(model, ["a red circle"], 2)
        replayed, _, _ = recompute_log_probs(model, trajectory, 1, condition, negative, policy)

    assert trajectory.old_token_log_probs.dtype == torch.float32
    assert bool(torch.isfinite(trajectory.old_token_log_probs).all())
    assert replayed.dtype == torch.float32
    assert bool(torch.isfinite(replayed).all())


def test_bf16_extreme_log_probs_direct():
    cond = torch.full((2, 4, 8192), -30.0, dtype=torch.bfloat16)
    cond[:, :, 0] = 0.0
    cond[0, 0, 5] = float("-inf")  # a backend that forbids a code
    uncond = torch.full_like(cond, -9.0)
    result = sampling_log_probs(cond, uncond, torch.tensor([3.0, 1.0]), torch.tensor([0.05, 0.05]))
    assert result.dtype == torch.float32
    assert bool(torch.isfinite(result).all())


def test_zero_temperature_is_floored():
    cond = torch.randn(1, 4, 16).log_softmax(-1)
    result = sampling_log_probs(cond, None, torch.tensor([1.0]), torch.tensor([0.0]))
    assert bool(torch.isfinite(result).all())
    assert torch.equal(result.argmax(-1), cond.argmax(-1))


def test_missing_uncond_with_guidance_raises():
    cond = torch.randn(2, 4, 8).log_softmax(-1)
    with pytest.raises(ValueError, match="uncond_log_probs is None"):
        sampling_log_probs(cond, None, torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]))


# ---------------------------------------------------------------- sampler step


def test_step_never_redraws_committed_tokens():
    mask_id = 8
    token_ids = torch.tensor([[1, mask_id, 2, mask_id, mask_id, 7]])
    # Every position puts almost all mass on code 0, which no committed position holds.
    cond = torch.full((1, 6, 8), -20.0)
    cond[:, :, 0] = 0.0
    knobs = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    sampler = MaskedSampler(mask_id)

    output = sampler.step(token_ids, cond, None, knobs, 0, 2, torch.Generator().manual_seed(0))

    committed = token_ids != mask_id
    assert torch.equal(output.next_ids[committed], token_ids[committed])
    assert not bool(output.fill_mask[committed].any())
    assert bool((output.token_log_probs[committed] == 0).all())
    assert output.next_ids.tolist() == [[1, 0, 2, 0, 0, 7]]


def test_step_remasks_least_confident_per_sample():
    # tau_r = 0. Position i draws code 0 with probability 1 - eps_i, where eps_i falls from 1e-2
    # to 1e-6 along the row, so confidence log(1 - eps_i) grows with i. Sample 0 keeps
    # floor(8 * 0.25) = 2 positions masked, sample 1 keeps floor(8 * 0.75) = 6.
    mask_id = 4
    token_ids = torch.full((2, 8), mask_id)
    dominant = 1 - torch.logspace(-2, -6, 8, dtype=torch.float64)
    probs = torch.stack([dominant, *[(1 - dominant) / 3] * 3], dim=-1)  # [L, V]
    cond = probs.log().float().expand(2, 8, 4)
    knobs = torch.tensor([[0.25, 1.0, 0.0, 1.0], [0.75, 1.0, 0.0, 1.0]])

    output = MaskedSampler(mask_id).step(token_ids, cond, None, knobs, 0, 4, torch.Generator().manual_seed(0))

    assert output.fill_mask[0].tolist() == [False] * 2 + [True] * 6
    assert output.fill_mask[1].tolist() == [False] * 6 + [True] * 2
    assert output.next_ids[0].tolist() == [mask_id] * 2 + [0] * 6
    assert output.next_ids[1].tolist() == [mask_id] * 6 + [0] * 2
    confidences = output.token_log_probs[0, 2:]
    assert bool((confidences[1:] > confidences[:-1]).all())


def test_step_on_full_canvas_fills_nothing():
    token_ids = torch.tensor([[1, 2, 3], [0, 0, 0]])
    cond = torch.randn(2, 3, 5).log_softmax(-1)
    knobs = torch.tensor([[0.5, 1.0, 1.0, 1.0]] * 2)

    output = MaskedSampler(5).step(token_ids, cond, None, knobs, 3, 10)

    assert torch.equal(output.next_ids, token_ids)
    assert not bool(output.fill_mask.any())
    assert bool((output.token_log_probs == 0).all())


def test_min_tokens_per_step_option():
    model = RandomMDM(num_tokens=16, codebook_size=8).eval()
    table = knob_table(6, 1.0, 1.0, 0.5, 1.0)  # ratio 1 keeps as many masked as allowed
    sampler = MaskedSampler(model.mask_token_id, min_tokens_per_step=3)
    trajectory = rollout(model, ScriptedPolicy(table), ["x"], 1, 6, sampler=sampler)
    assert [counts[0] for counts in fill_counts(trajectory)] == [3, 3, 3, 3, 3, 1]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"mask_token_id": True}, TypeError),
        ({"mask_token_id": 4.0}, TypeError),
        ({"mask_token_id": 4, "min_tokens_per_step": 0}, ValueError),
        ({"mask_token_id": 4, "min_tokens_per_step": 1.5}, TypeError),
    ],
)
def test_sampler_rejects_invalid_options(kwargs, error):
    with pytest.raises(error):
        MaskedSampler(**kwargs)


@pytest.mark.parametrize(
    "knobs",
    [
        [[0.5, -1.0, 0.0, 1.0]],  # negative sampling temperature
        [[0.5, 1.0, -0.1, 1.0]],  # negative re-mask temperature
        [[0.5, float("nan"), 0.0, 1.0]],
        [[0.5, 1.0, 0.0]],  # three knobs
    ],
)
def test_step_rejects_invalid_knobs(knobs):
    cond = torch.randn(1, 4, 8).log_softmax(-1)
    with pytest.raises(ValueError, match="knob"):
        MaskedSampler(8).step(torch.full((1, 4), 8), cond, None, torch.tensor(knobs), 0, 2)


# ---------------------------------------------------------------- schedules at the edges


@pytest.mark.parametrize("last_ratio", [0.0, 0.5])
def test_last_step_fills_all_tokens(last_ratio):
    model = RandomMDM(num_tokens=16, codebook_size=32).eval()
    table = knob_table(4, [0.75, 0.5, 0.25, last_ratio], 1.0, [2.0, 1.0, 0.1, 0.01], 1.0)
    generator = torch.Generator().manual_seed(3)

    trajectory = rollout(model, ScriptedPolicy(table), ["a red circle"], 2, 4, generator=generator)

    assert fill_counts(trajectory) == [[4, 4], [4, 4], [4, 4], [4, 4]]
    assert bool((trajectory.final_ids != model.mask_token_id).all())
    assert bool((trajectory.fill_step < 4).all())
    assert bool(torch.isfinite(trajectory.old_token_log_probs).all())
    assert bool((trajectory.old_token_log_probs < 0).all())


def test_non_monotone_ratio_with_more_steps_than_tokens():
    model = RecordingMDM(num_tokens=16, codebook_size=32).eval()
    ratios = [0.9, 0.2, 0.8, 0.95, 0.1] + [0.5] * 15
    table = knob_table(20, ratios, 1.0, 1.0, 1.0)
    generator = torch.Generator().manual_seed(4)

    trajectory = rollout(model, ScriptedPolicy(table), ["two blue squares"], 1, 20, generator=generator)

    # masked 16 -> keep 14, 14 -> keep floor(3.2) = 3, 3 -> keep min(12, 2), 2 -> 1, 1 -> 0.
    assert [counts[0] for counts in fill_counts(trajectory)] == [2, 11, 1, 1, 1] + [0] * 15
    assert bool((trajectory.final_ids != model.mask_token_id).all())
    assert trajectory.active_samples(4).tolist() == [True]
    assert trajectory.active_samples(5).tolist() == [False]
    assert len(model.calls) == 20
    for before, after in zip(model.calls[:-1], model.calls[1:], strict=True):
        committed = before.token_ids != model.mask_token_id
        assert torch.equal(after.token_ids[committed], before.token_ids[committed])


def test_ratio_one_until_last_step():
    model = RandomMDM(num_tokens=16, codebook_size=32).eval()
    table = knob_table(5, 1.0, 1.0, 1.0, 1.0)
    trajectory = rollout(
        model, ScriptedPolicy(table), ["x"], 1, 5, generator=torch.Generator().manual_seed(5)
    )
    assert [counts[0] for counts in fill_counts(trajectory)] == [1, 1, 1, 1, 12]
