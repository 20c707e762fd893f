"""Tests of the predefined schedule and the schedule policy; expected values are worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from cogrpo_lightning.schedule import KNOB_NAMES, PredefinedSchedule, SchedulePolicy
from cogrpo_lightning.schedule.policy import _squash

# ---------------------------------------------------------------- PredefinedSchedule


def test_cosine_schedule_hand_values():
    # T = 4: r_t = cos(pi/2 * (t+1)/4) = cos 22.5, 45, 67.5, 90 degrees; tau_r = 2 - 2t/3
    values = PredefinedSchedule().values(4)

    assert values.shape == (4, 4)
    assert values.dtype == torch.float32
    torch.testing.assert_close(values[:, 0], torch.tensor([0.9238795, 0.7071068, 0.3826834, 0.0]))
    assert values[-1, 0].item() == 0.0  # exactly 0, not cos(pi/2) = 6.1e-17
    assert values[:, 1].tolist() == [1.0, 1.0, 1.0, 1.0]
    torch.testing.assert_close(values[:, 2], torch.tensor([2.0, 4 / 3, 2 / 3, 0.0]))
    assert values[-1, 2].item() == 0.0
    assert values[:, 3].tolist() == [1.0, 1.0, 1.0, 1.0]


def test_linear_schedule_and_custom_constants():
    schedule = PredefinedSchedule(
        remask_ratio="linear",
        sampling_temperature=0.5,
        remask_temperature_start=4.5,
        remask_temperature_end=0.5,
        cfg_scale=9.0,
    )
    values = schedule.values(5, dtype=torch.float64)

    # r_t = 1 - (t+1)/5; tau_r = 4.5 - 4 * t/4
    assert values[:, 0].tolist() == [0.8, 0.6, 0.4, 0.2, 0.0]
    assert values[:, 2].tolist() == [4.5, 3.5, 2.5, 1.5, 0.5]
    assert values[:, 1].tolist() == [0.5] * 5
    assert values[:, 3].tolist() == [9.0] * 5


def test_single_step_schedule():
    # T = 1: the only step fills everything (r = 0) and uses the start re-mask temperature
    values = PredefinedSchedule().values(1)

    assert values.tolist() == [[0.0, 1.0, 2.0, 1.0]]


def test_predefined_rejects_bad_values():
    with pytest.raises(ValueError, match=r"remask_ratio must be one of cosine, linear, got 'exp'"):
        PredefinedSchedule(remask_ratio="exp")
    with pytest.raises(ValueError, match=r"sampling_temperature must be a finite number > 0, got 0.0"):
        PredefinedSchedule(sampling_temperature=0.0)
    with pytest.raises(ValueError, match=r"remask_temperature_start must be a finite number >= 0, got -1.0"):
        PredefinedSchedule(remask_temperature_start=-1.0)
    with pytest.raises(ValueError, match=r"remask_temperature_end must be a finite number >= 0, got nan"):
        PredefinedSchedule(remask_temperature_end=math.nan)
    with pytest.raises(
        ValueError, match=r"cfg_scale must be a finite number > 0 \(1.0 means no guidance\), got 0"
    ):
        PredefinedSchedule(cfg_scale=0)
    with pytest.raises(ValueError, match=r"num_steps must be an integer >= 1, got 0"):
        PredefinedSchedule().values(0)


def test_predefined_lists_every_problem():
    with pytest.raises(ValueError, match=r"sampling_temperature must .*; cfg_scale must"):
        PredefinedSchedule(sampling_temperature=-1.0, cfg_scale=-2.0)


# ---------------------------------------------------------------- squashing


@pytest.mark.parametrize("num_steps", [1, 4, 16])
@pytest.mark.parametrize(
    "schedule", [PredefinedSchedule(), PredefinedSchedule("linear", 0.7, 4.5, 0.01, 9.0)]
)
def test_zero_action_reproduces_predefined_bits(num_steps, schedule):
    policy = SchedulePolicy(num_steps, predefined=schedule)
    expected = schedule.values(num_steps)
    for step in range(num_steps):
        for num_samples in (1, 5, 37):
            actions = policy.mean_action(step, num_steps, num_samples)
            values = policy.knob_values(actions, step, num_steps)

            assert torch.equal(actions, torch.zeros(num_samples, 4))
            assert torch.equal(values, expected[step].expand(num_samples, 4)), (step, num_samples)


def test_nonzero_action_hand_squash():
    # T = 2, t = 0 with a linear ratio: defaults [0.5, 1, 2, 3].
    # ratio:   sigmoid(ln 3 + logit 0.5) = 3 / (3 + 1) = 0.75
    # tau_s:   softplus(ln 2 + ln(e - 1)) = ln(1 + 2(e - 1)) = ln(2e - 1) = 1.4898801
    # tau_r:   softplus(-ln 2 + ln(e^2 - 1)) = ln(1 + (e^2 - 1)/2) = ln((e^2 + 1)/2) = 1.4337808
    # cfg:     action 0 keeps 3.0
    policy = SchedulePolicy(2, predefined=PredefinedSchedule(remask_ratio="linear", cfg_scale=3.0))
    actions = torch.tensor([[math.log(3), math.log(2), -math.log(2), 0.0]])
    values = policy.knob_values(actions, 0, 2)

    torch.testing.assert_close(values, torch.tensor([[0.75, 1.4898801, 1.4337808, 3.0]]), rtol=0, atol=1e-6)


def test_boundary_defaults_stay_put():
    # last step: ratio 0 and re-mask temperature 0 have infinite pre-images, so they keep the default
    policy = SchedulePolicy(4)
    actions = torch.tensor([[5.0, 0.0, -3.0, 0.0], [-100.0, 100.0, 100.0, -100.0]], requires_grad=True)
    values = policy.knob_values(actions, 3, 4)
    values.sum().backward()

    assert values[:, 0].tolist() == [0.0, 0.0]
    assert values[:, 2].tolist() == [0.0, 0.0]
    assert torch.isfinite(actions.grad).all()
    # a ratio default of 1 is handled the same way
    defaults = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert _squash(torch.tensor([[-4.0, 0.0, 0.0, 0.0]]), defaults)[0, 0].item() == 1.0


def test_negative_actions_keep_precision():
    # softplus(a + ln(e - 1)) = ln(1 + (e - 1) e^a) = (e - 1) e^a for very negative a:
    # a = -20: 1.7182818 * 2.0611536e-9 = 3.5416414e-9; a = -30: 1.7182818 * 9.3576230e-14 = 1.6079029e-13
    policy = SchedulePolicy(4)
    actions = torch.tensor([[0.0, -20.0, 0.0, 0.0], [0.0, -30.0, 0.0, 0.0]])
    values = policy.knob_values(actions, 0, 4)

    torch.testing.assert_close(values[:, 1], torch.tensor([3.5416414e-9, 1.6079029e-13]), rtol=1e-5, atol=0)


def test_extreme_actions_stay_in_range():
    policy = SchedulePolicy(4, predefined=PredefinedSchedule(cfg_scale=9.0))
    actions = torch.tensor([[-1e4] * 4, [1e4] * 4, [-50.0] * 4, [50.0] * 4])
    for step in range(4):
        values = policy.knob_values(actions, step, 4)

        assert torch.isfinite(values).all()
        assert ((values[:, 0] >= 0) & (values[:, 0] <= 1)).all()
        assert (values[:, 1:] >= 0).all()


# ---------------------------------------------------------------- Gaussian policy


def test_log_prob_matches_torch_normal():
    policy = SchedulePolicy(4, init_std=0.7, learn_std=True)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        policy.step_means.copy_(torch.randn(4, 4, generator=generator))
    actions = torch.randn(6, 4, generator=generator)

    expected = Normal(policy.step_means[2], torch.full((4,), 0.7)).log_prob(actions).sum(-1)
    torch.testing.assert_close(policy.log_prob(actions, 2, 4), expected)


def test_gradient_reaches_step_mean():
    # d(-sum_n log N(a_n; mu, s)) / d mu = -sum_n (a_n - mu) / s^2, only in the row of the step
    policy = SchedulePolicy(4, init_std=0.5)
    actions = torch.tensor([[0.5, -0.5, 1.0, 0.0], [1.5, 0.5, 1.0, -2.0]])
    loss = -policy.log_prob(actions, 2, 4).sum()
    loss.backward()

    expected = -actions.sum(dim=0) / 0.25  # mu = 0
    torch.testing.assert_close(policy.step_means.grad[2], expected)
    assert torch.equal(policy.step_means.grad[[0, 1, 3]], torch.zeros(3, 4))


def test_entropy_hand_value_and_set_std():
    # 0.5 * ln(2 pi e sigma^2) per knob; sigma = 0.5 gives 0.7257914, times 4 knobs = 2.9031654
    policy = SchedulePolicy(4)
    torch.testing.assert_close(policy.entropy(0, 4, 3), torch.full((3,), 2.9031654))

    policy.set_std(0.2)
    torch.testing.assert_close(policy.std(), torch.full((4,), 0.2))
    with pytest.raises(ValueError, match=r"std must be a finite number >= min_std=0.001, got 0.0"):
        policy.set_std(0.0)


def test_sample_is_reproducible_with_generator():
    policy = SchedulePolicy(4)
    first = policy.sample(1, 4, 8, generator=torch.Generator().manual_seed(7))
    second = policy.sample(1, 4, 8, generator=torch.Generator().manual_seed(7))

    assert torch.equal(first, second)
    assert not first.requires_grad
    # the log-prob of the drawn actions under the unchanged policy is the same on recomputation
    assert torch.equal(policy.log_prob(first, 1, 4), policy.log_prob(first.clone(), 1, 4))


def test_frozen_knobs_stay_default():
    schedule = PredefinedSchedule(cfg_scale=9.0)
    policy = SchedulePolicy(4, predefined=schedule, frozen_knobs=["cfg_scale", "remask_ratio"])
    actions = policy.sample(1, 4, 16, generator=torch.Generator().manual_seed(0))

    assert policy.free_knobs == ("sampling_temperature", "remask_temperature")
    assert torch.equal(actions[:, [0, 3]], torch.zeros(16, 2))
    assert (actions[:, [1, 2]] != 0).all()
    values = policy.knob_values(actions, 1, 4)
    assert torch.equal(values[:, 0], schedule.values(4)[1, 0].expand(16))
    assert torch.equal(values[:, 3], torch.full((16,), 9.0))

    # frozen columns contribute nothing: the log-prob is that of the two free knobs, whatever the frozen columns hold
    expected = Normal(torch.zeros(2), torch.full((2,), 0.5)).log_prob(actions[:, [1, 2]]).sum(-1)
    torch.testing.assert_close(policy.log_prob(actions, 1, 4), expected)
    tampered = actions.clone()
    tampered[:, [0, 3]] = 3.0
    assert torch.equal(policy.log_prob(tampered, 1, 4), policy.log_prob(actions, 1, 4))
    assert torch.equal(policy.knob_values(tampered, 1, 4), values)
    assert [tuple(p.shape) for p in policy.parameters()] == [(4, 2)]


def test_all_knobs_frozen_warns():
    with pytest.warns(UserWarning, match=r"all four schedule knobs are frozen"):
        policy = SchedulePolicy(4, frozen_knobs=list(KNOB_NAMES), learn_std=True)

    assert list(policy.parameters()) == []
    assert torch.equal(policy.sample(0, 4, 3), torch.zeros(3, 4))
    assert torch.equal(policy.log_prob(torch.ones(3, 4), 0, 4), torch.zeros(3))
    assert torch.equal(policy.entropy(0, 4, 3), torch.zeros(3))


# ---------------------------------------------------------------- other step counts


def test_interpolation_to_fewer_and_more_steps():
    # T = 4 means 0, 3, 6, 9 (same for every knob). Step t of T' sits at t * 3 / (T' - 1).
    policy = SchedulePolicy(4)
    with torch.no_grad():
        policy.step_means.copy_(torch.tensor([0.0, 3.0, 6.0, 9.0])[:, None].expand(4, 4))

    def mean_of(step: int, num_steps: int) -> float:
        return policy.mean_action(step, num_steps, 1)[0, 0].item()

    assert [mean_of(t, 2) for t in range(2)] == [0.0, 9.0]  # positions 0, 3
    assert [mean_of(t, 3) for t in range(3)] == [0.0, 4.5, 9.0]  # positions 0, 1.5, 3
    assert mean_of(1, 7) == 1.5  # position 0.5
    assert mean_of(2, 7) == 3.0  # position 1, a grid point
    assert mean_of(5, 16) == 3.0  # position 5 * 3 / 15 = 1
    assert mean_of(0, 1) == 0.0  # a single step reads mu_0
    # defaults come from the predefined schedule at the evaluated step count
    zero = torch.zeros(1, 4)
    assert torch.equal(policy.knob_values(zero, 0, 2), PredefinedSchedule().values(2)[:1])


def test_single_step_policy_serves_any_step_count():
    policy = SchedulePolicy(1)
    with torch.no_grad():
        policy.step_means.fill_(2.0)

    assert policy.mean_action(3, 4, 1).tolist() == [[2.0] * 4]


# ---------------------------------------------------------------- state head


def test_state_head_starts_at_predefined():
    policy = SchedulePolicy(4, head="state", feature_dim=8, condition_dim=6)
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(5, 8, generator=generator)
    prompt_embedding = torch.randn(5, 6, generator=generator)

    assert policy.uses_features
    assert policy.uses_prompt_embedding
    for step in range(4):
        actions = policy.mean_action(step, 4, 5, features, prompt_embedding)
        assert torch.equal(actions, torch.zeros(5, 4))
        values = policy.knob_values(actions, step, 4)
        assert torch.equal(values, PredefinedSchedule().values(4)[step].expand(5, 4))


def test_state_head_gradient_and_input_checks():
    policy = SchedulePolicy(4, head="state", condition_dim=6)
    prompt_embedding = torch.randn(3, 6, requires_grad=True)
    actions = policy.sample(0, 4, 3, prompt_embedding=prompt_embedding)
    (-policy.log_prob(actions, 0, 4, prompt_embedding=prompt_embedding).sum()).backward()

    assert not policy.uses_features
    assert policy.state_net[-1].bias.grad.abs().sum() > 0
    assert prompt_embedding.grad is None  # inputs are detached
    with pytest.raises(
        ValueError, match=r"the state head needs prompt_embedding of shape \[N, 6\], got None"
    ):
        policy.sample(0, 4, 3)
    with pytest.raises(ValueError, match=r"prompt_embedding must have shape \[3, 6\], got \[3, 5\]"):
        policy.sample(0, 4, 3, prompt_embedding=torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"export_schedule needs head='per_step'"):
        policy.export_schedule()


# ---------------------------------------------------------------- export and validation


def test_export_schedule_returns_plain_floats():
    policy = SchedulePolicy(4)
    exported = policy.export_schedule()

    assert list(exported) == list(KNOB_NAMES)
    assert all(type(value) is float for values in exported.values() for value in values)
    expected = PredefinedSchedule().values(4)
    for index, name in enumerate(KNOB_NAMES):
        assert exported[name] == expected[:, index].tolist()
    assert len(policy.export_schedule(num_steps=2)["cfg_scale"]) == 2


def test_policy_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"frozen_knobs contains unknown knob names \['guidance'\]"):
        SchedulePolicy(4, frozen_knobs=["guidance"])
    with pytest.raises(
        ValueError, match=r"frozen_knobs must be a list of knob names, got the string 'cfg_scale'"
    ):
        SchedulePolicy(4, frozen_knobs="cfg_scale")
    with pytest.raises(ValueError, match=r"init_std must be a finite number > 0, got 0.0"):
        SchedulePolicy(4, init_std=0.0)
    with pytest.raises(ValueError, match=r"init_std=0.01 is below min_std=0.1"):
        SchedulePolicy(4, init_std=0.01, min_std=0.1)
    with pytest.raises(ValueError, match=r"head must be one of per_step, state, got 'mlp'"):
        SchedulePolicy(4, head="mlp")
    with pytest.raises(ValueError, match=r"head='state' needs feature_dim or condition_dim"):
        SchedulePolicy(4, head="state")
    with pytest.raises(ValueError, match=r"num_steps must be an integer >= 1, got 0"):
        SchedulePolicy(0)
    with pytest.raises(ValueError, match=r"step_embedding_dim must be an even integer >= 2, got 3"):
        SchedulePolicy(4, head="state", feature_dim=2, step_embedding_dim=3)


def test_policy_rejects_bad_calls():
    policy = SchedulePolicy(4)
    with pytest.raises(ValueError, match=r"step_index must be an integer in \[0, 3\], got 4"):
        policy.sample(4, 4, 2)
    with pytest.raises(ValueError, match=r"actions must have shape \[N, 4\], got \[2, 3\]"):
        policy.knob_values(torch.zeros(2, 3), 0, 4)
    with pytest.raises(ValueError, match=r"num_samples must be an integer >= 1, got 0"):
        policy.mean_action(0, 4, 0)
