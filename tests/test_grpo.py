"""Tests of the GRPO maths: advantages, clipped surrogate loss and the k3 KL estimator.

Expected values are worked out by hand in the comments. Stds are population stds (divide by n).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from cogrpo_lightning.grpo import (
    RewardWarning,
    clip_advantages,
    clipped_surrogate,
    group_advantages,
    kl_k3,
    masked_mean,
    validate_group_size,
)

# ---------------------------------------------------------------- group_advantages


def test_all_equal_group_gives_exact_zeros():
    # every reward 0.5, so the group is flat: advantages exactly 0, no NaN, share of flat groups 1
    with pytest.warns(RewardWarning, match="all 1 groups have zero reward std"):
        result = group_advantages(torch.full((4,), 0.5), group_size=4)

    assert torch.equal(result.advantages, torch.zeros(4))
    assert not torch.isnan(result.advantages).any()
    assert result.frac_reward_zero_std == 1.0
    assert result.num_zero_std_groups == 1
    assert result.group_stds.tolist() == [0.0]
    assert result.valid_mask.all()


def test_flat_group_is_zero_under_every_scale():
    # the float64 mean of [0.1, 0.1, 0.1] is 0.10000000000000002, not 0.1, but max == min still detects the flat group
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 2.0, 3.0], dtype=torch.float64)
    for scale in ("group", "batch", "none"):
        result = group_advantages(rewards, group_size=3, scale=scale, eps=0.0)

        assert torch.equal(result.advantages[:3], torch.zeros(3)), scale
        assert result.frac_reward_zero_std == 0.5, scale


def test_group_size_one_rejected():
    with pytest.raises(ValueError, match=r"GRPO needs at least 2 samples per prompt .* got group_size=1"):
        group_advantages(torch.tensor([1.0, 2.0]), group_size=1)
    with pytest.raises(ValueError, match=r"GRPO needs at least 2 samples per prompt .* got group_size=1"):
        validate_group_size(1)
    with pytest.raises(ValueError, match=r"group_size must be an integer of at least 2, got 2.0"):
        validate_group_size(2.0)


def test_nan_reward_left_out_of_group():
    # Group 0 = [1, NaN, 0, 2]: finite values 1, 0, 2 give mean 1 and
    # std = sqrt(((1-1)^2 + (0-1)^2 + (2-1)^2) / 3) = sqrt(2/3) = 0.8164966, std + eps = 0.8165966.
    # Advantages: [0, 0 (NaN), -1/0.8165966, 1/0.8165966] = [0, 0, -1.2245949, 1.2245949].
    # Group 1 = [3, 5, 7, 9]: mean 6, std sqrt(20/4) = sqrt(5) = 2.2360680, std + eps = 2.2361680,
    # advantages [-3, -1, 1, 3] / 2.2361680 = [-1.3415808, -0.4471936, 0.4471936, 1.3415808].
    rewards = torch.tensor([1.0, math.nan, 0.0, 2.0, 3.0, 5.0, 7.0, 9.0])
    with pytest.warns(RewardWarning, match=r"1 of 8 rewards are NaN or infinite"):
        result = group_advantages(rewards, group_size=4)

    expected = torch.tensor([0.0, 0.0, -1.2245949, 1.2245949, -1.3415808, -0.4471936, 0.4471936, 1.3415808])
    torch.testing.assert_close(result.advantages, expected, rtol=0, atol=1e-6)
    assert result.advantages[1].item() == 0.0
    assert result.valid_mask.tolist() == [True, False, True, True, True, True, True, True]
    assert result.num_nan_rewards == 1
    torch.testing.assert_close(result.group_means, torch.tensor([1.0, 6.0]))
    torch.testing.assert_close(result.group_stds, torch.tensor([math.sqrt(2 / 3), math.sqrt(5)]))
    assert result.num_zero_std_groups == 0

    # the second group is unaffected by the NaN in the first
    alone = group_advantages(torch.tensor([3.0, 5.0, 7.0, 9.0]), group_size=4)
    assert torch.equal(result.advantages[4:], alone.advantages)


def test_nan_sample_gets_no_gradient():
    # the NaN sample is dropped from the loss, even if its log-probs are NaN too
    rewards = torch.tensor([1.0, math.nan, 0.0, 2.0, 3.0, 5.0, 7.0, 9.0])
    with pytest.warns(RewardWarning):
        result = group_advantages(rewards, group_size=4)
    log_probs = torch.full((8, 3), -1.0)
    log_probs[1] = math.nan
    log_probs.requires_grad_(True)

    surrogate = clipped_surrogate(
        log_probs, log_probs.detach().clone(), result.advantages, sample_mask=result.valid_mask
    )
    surrogate.loss.backward()

    assert torch.isfinite(surrogate.loss)
    assert torch.equal(log_probs.grad[1], torch.zeros(3))
    assert surrogate.num_counted.item() == 21  # 7 valid samples x 3 tokens
    assert log_probs.grad[3].abs().sum() > 0


def test_all_nan_group_statistics():
    rewards = torch.tensor([math.nan, math.inf, 1.0, 3.0])
    with pytest.warns(RewardWarning, match=r"2 of 4 rewards are NaN or infinite"):
        result = group_advantages(rewards, group_size=2)

    assert result.advantages.tolist()[:2] == [0.0, 0.0]
    assert math.isnan(result.group_means[0].item())
    assert result.group_stds[0].item() == 0.0
    assert result.num_zero_std_groups == 1
    assert result.frac_reward_zero_std == 0.5


def test_groups_normalise_on_their_own_statistics():
    # [1, 2, 3, 4]: mean 2.5, std sqrt(1.25) = 1.1180340; [10, 20, 30, 40]: mean 25, std 11.180340.
    # Both give [-1.5, -0.5, 0.5, 1.5] / 1.1180340 = [-1.3416408, -0.4472136, 0.4472136, 1.3416408]
    # (eps = 1e-4 shifts the first group by about 1e-4 relative, the second by 1e-5).
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0])
    result = group_advantages(rewards, group_size=4, scale="group")

    expected = torch.tensor([-1.3416408, -0.4472136, 0.4472136, 1.3416408])
    torch.testing.assert_close(result.advantages[:4], expected, rtol=2e-4, atol=0)
    torch.testing.assert_close(result.advantages[4:], expected, rtol=2e-4, atol=0)
    exact = group_advantages(rewards, group_size=4, scale="group", eps=0.0)
    torch.testing.assert_close(exact.advantages[:4], exact.advantages[4:], rtol=1e-6, atol=0)


def test_batch_scale_uses_batch_std():
    # scale="batch": all 8 rewards have mean 13.75 and
    # variance 3030/8 - 13.75^2 = 378.75 - 189.0625 = 189.6875, std 13.772708, std + eps 13.772808.
    # Group 0: [-1.5, -0.5, 0.5, 1.5] / 13.772808; group 1: ten times that.
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0])
    result = group_advantages(rewards, group_size=4, scale="batch")

    first = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / 13.772808
    torch.testing.assert_close(result.advantages[:4], first, rtol=1e-5, atol=0)
    torch.testing.assert_close(result.advantages[4:], 10 * first, rtol=1e-5, atol=0)
    assert not torch.allclose(result.advantages[:4], result.advantages[4:])


def test_none_scale_subtracts_group_mean():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0])
    result = group_advantages(rewards, group_size=4, scale="none")

    # R - mean_g with means 2.5 and 25
    expected = torch.tensor([-1.5, -0.5, 0.5, 1.5, -15.0, -5.0, 5.0, 15.0])
    assert torch.equal(result.advantages, expected)
    assert result.advantages.dtype == torch.float32


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match=r"number of rewards \(6\) is not divisible by group_size=4"):
        group_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match=r"scale must be one of group, batch, none, got 'std'"):
        group_advantages(torch.zeros(4), group_size=2, scale="std")
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0, got -1"):
        group_advantages(torch.zeros(4), group_size=2, eps=-1)
    with pytest.raises(ValueError, match=r"rewards must be a 1-D tensor \[N\], got \[2, 2\]"):
        group_advantages(torch.zeros(2, 2), group_size=2)
    with pytest.raises(ValueError, match=r"rewards is empty"):
        group_advantages(torch.zeros(0), group_size=2)


def test_partly_flat_batch_does_not_warn():
    # one flat group and one informative group: no "all groups have zero reward std" warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = group_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0]), group_size=2)

    assert result.frac_reward_zero_std == 0.5
    # [0, 1]: mean 0.5, std 0.5, advantages [-0.5, 0.5] / 0.5001
    torch.testing.assert_close(result.advantages[2:], torch.tensor([-0.5, 0.5]) / 0.5001)


def test_clip_advantages():
    advantages = torch.tensor([-7.0, -1.0, 3.0, 6.0])

    assert clip_advantages(advantages, 5.0).tolist() == [-5.0, -1.0, 3.0, 5.0]
    assert clip_advantages(advantages, None) is advantages
    with pytest.raises(ValueError, match=r"max_abs must be a number > 0 or None \(no clipping\), got 0"):
        clip_advantages(advantages, 0)


# ---------------------------------------------------------------- clipped_surrogate

# Token level, clip range [0.8, 1.2]. Sample 0 has A = +1, sample 1 has A = -1; each has one token
# with ratio 1.5 and one with ratio 0.5:
#   r=1.5, A=+1: min(1.5, 1.2) = 1.2    -> loss -1.2, clipped
#   r=0.5, A=+1: min(0.5, 0.8) = 0.5    -> loss -0.5
#   r=1.5, A=-1: min(-1.5, -1.2) = -1.5 -> loss +1.5
#   r=0.5, A=-1: min(-0.5, -0.8) = -0.8 -> loss +0.8, clipped
# mean loss (-1.2 - 0.5 + 1.5 + 0.8) / 4 = 0.15, clip fraction 2/4, ratio mean 1.0.
RATIOS = torch.tensor([[1.5, 0.5], [1.5, 0.5]])
ADVANTAGES = torch.tensor([1.0, -1.0])


def test_token_surrogate_hand_values():
    log_probs = RATIOS.log().requires_grad_(True)
    result = clipped_surrogate(log_probs, torch.zeros(2, 2), ADVANTAGES)
    result.loss.backward()

    torch.testing.assert_close(result.loss, torch.tensor(0.15), rtol=0, atol=1e-6)
    torch.testing.assert_close(result.clip_fraction, torch.tensor(0.5))
    torch.testing.assert_close(result.ratio_mean, torch.tensor(1.0))
    # k3 of old vs new: (r - 1) - log r = 0.0945349 at r = 1.5 and 0.1931472 at r = 0.5; mean 0.1438410
    torch.testing.assert_close(result.approx_kl, torch.tensor(0.1438410), rtol=0, atol=1e-6)
    # d loss / d log r = -A * r / 4 on unclipped tokens, 0 on clipped ones
    expected_grad = torch.tensor([[0.0, -0.125], [0.375, 0.0]])
    torch.testing.assert_close(log_probs.grad, expected_grad, rtol=0, atol=1e-6)


def test_token_surrogate_mask_drops_tokens():
    # dropping the clipped token of sample 0: (-0.5 + 1.5 + 0.8) / 3 = 0.6, clip fraction 1/3
    mask = torch.tensor([[False, True], [True, True]])
    log_probs = RATIOS.log().requires_grad_(True)
    result = clipped_surrogate(log_probs, torch.zeros(2, 2), ADVANTAGES, mask=mask)
    result.loss.backward()

    torch.testing.assert_close(result.loss, torch.tensor(0.6), rtol=0, atol=1e-6)
    torch.testing.assert_close(result.clip_fraction, torch.tensor(1 / 3))
    assert result.num_counted.item() == 3
    assert log_probs.grad[0, 0].item() == 0.0


def test_asymmetric_clip_range():
    # ratio 1.25 with A = +1 stays inside [0.8, 1.28] (loss -1.25) but is clipped at 1.2 (loss -1.2)
    log_probs = torch.tensor([math.log(1.25)])
    wide = clipped_surrogate(log_probs, torch.zeros(1), torch.ones(1), clip_high=0.28, level="step")
    narrow = clipped_surrogate(log_probs, torch.zeros(1), torch.ones(1), clip_high=0.2, level="step")

    torch.testing.assert_close(wide.loss, torch.tensor(-1.25))
    assert wide.clip_fraction.item() == 0.0
    torch.testing.assert_close(narrow.loss, torch.tensor(-1.2))
    assert narrow.clip_fraction.item() == 1.0


def test_step_surrogate_hand_values():
    # r=1.1, A=2:    min(2.2, 2.2) = 2.2           -> -2.2
    # r=2.0, A=-1:   min(-2.0, -1.2) = -2.0        -> +2.0
    # r=0.7, A=-0.5: min(-0.35, -0.4) = -0.4       -> +0.4, clipped
    # mean (-2.2 + 2.0 + 0.4) / 3 = 0.0666667, clip fraction 1/3
    log_probs = torch.tensor([1.1, 2.0, 0.7]).log()
    result = clipped_surrogate(log_probs, torch.zeros(3), torch.tensor([2.0, -1.0, -0.5]), level="step")

    torch.testing.assert_close(result.loss, torch.tensor(0.2 / 3), rtol=0, atol=1e-6)
    torch.testing.assert_close(result.clip_fraction, torch.tensor(1 / 3))


def test_ratio_exactly_one_before_update():
    generator = torch.Generator().manual_seed(0)
    log_probs = (-5 * torch.rand(4, 6, generator=generator)).requires_grad_(True)
    advantages = torch.randn(4, generator=generator)
    result = clipped_surrogate(log_probs, log_probs.detach().clone(), advantages)
    result.loss.backward()

    assert result.ratio_mean.item() == 1.0
    assert result.approx_kl.item() == 0.0
    assert result.clip_fraction.item() == 0.0
    # with r = 1 the loss is -mean(A) and each token's gradient is -A / 24
    torch.testing.assert_close(result.loss, -advantages.mean())
    torch.testing.assert_close(log_probs.grad, (-advantages / 24)[:, None].expand(4, 6))


def test_empty_mask_gives_zero_loss_with_graph():
    log_probs = torch.full((2, 3), -math.inf).requires_grad_(True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    result = clipped_surrogate(log_probs, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask=mask)
    result.loss.backward()

    assert result.loss.item() == 0.0
    assert result.loss.requires_grad
    assert torch.equal(log_probs.grad, torch.zeros(2, 3))
    assert result.ratio_mean.item() == 1.0
    assert result.num_counted.item() == 0


def test_surrogate_rejects_bad_input():
    lp = torch.zeros(2, 3)
    advantages = torch.zeros(2)
    with pytest.raises(ValueError, match=r"level must be one of token, step, got 'sequence'"):
        clipped_surrogate(lp, lp, advantages, level="sequence")
    with pytest.raises(ValueError, match=r"clip_low must be a number in \[0, 1\), got 1.0"):
        clipped_surrogate(lp, lp, advantages, clip_low=1.0)
    with pytest.raises(ValueError, match=r"clip_high must be a finite number >= 0, got -0.1"):
        clipped_surrogate(lp, lp, advantages, clip_high=-0.1)
    with pytest.raises(ValueError, match=r"log_probs must have shape \[N\] at level='step', got \[2, 3\]"):
        clipped_surrogate(lp, lp, advantages, level="step")
    with pytest.raises(
        ValueError, match=r"old_log_probs must have the shape of log_probs \[2, 3\], got \[2, 2\]"
    ):
        clipped_surrogate(lp, torch.zeros(2, 2), advantages)
    with pytest.raises(ValueError, match=r"advantages must have shape \[2\], got \[3\]"):
        clipped_surrogate(lp, lp, torch.zeros(3))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \[2, 3\], got torch.float32"):
        clipped_surrogate(lp, lp, advantages, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"sample_mask must be a bool tensor of shape \[2\]"):
        clipped_surrogate(lp, lp, advantages, sample_mask=torch.ones(3, dtype=torch.bool))


# ---------------------------------------------------------------- KL


def test_kl_k3_hand_values():
    # pi = 0.5, ref = 0.25: x = log(0.5) = -0.6931472, k3 = 0.5 + 0.6931472 - 1 = 0.1931472
    # pi = 0.25, ref = 0.5: x = log(2) = 0.6931472, k3 = 2 - 0.6931472 - 1 = 0.3068528
    # pi = ref: k3 = 0
    log_probs = torch.tensor([0.5, 0.25, 0.3]).log().requires_grad_(True)
    ref_log_probs = torch.tensor([0.25, 0.5, 0.3]).log()
    values = kl_k3(log_probs, ref_log_probs)
    values.sum().backward()

    torch.testing.assert_close(values, torch.tensor([0.1931472, 0.3068528, 0.0]), rtol=0, atol=1e-6)
    assert values[2].item() == 0.0
    # d k3 / d log pi = 1 - ref / pi: 1 - 0.5 = 0.5, 1 - 2 = -1, 0
    torch.testing.assert_close(log_probs.grad, torch.tensor([0.5, -1.0, 0.0]), rtol=0, atol=1e-6)


def test_kl_k3_non_negative_for_tiny_differences():
    log_probs = torch.tensor([-1.0, -1.0, -1.0])
    ref_log_probs = log_probs + torch.tensor([1e-8, -1e-8, 3e-7])
    assert (kl_k3(log_probs, ref_log_probs) >= 0).all()


def test_kl_k3_mask_and_masked_mean():
    # the -inf entry is masked: value 0, gradient 0, and the mean is over the 2 counted entries
    log_probs = torch.tensor([math.log(0.5), -math.inf, math.log(0.25)]).requires_grad_(True)
    ref_log_probs = torch.tensor([0.25, 0.5, 0.5]).log()
    mask = torch.tensor([True, False, True])
    values = kl_k3(log_probs, ref_log_probs, mask=mask)
    mean = masked_mean(values, mask)
    mean.backward()

    # (0.1931472 + 0.3068528) / 2 = 0.25
    torch.testing.assert_close(mean, torch.tensor(0.25), rtol=0, atol=1e-6)
    assert values[1].item() == 0.0
    assert log_probs.grad[1].item() == 0.0
    assert torch.isfinite(log_probs.grad).all()


def test_masked_mean_over_dim_and_empty():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, False, True], [False, False, False]])

    assert masked_mean(values, mask, dim=1).tolist() == [2.0, 0.0]
    assert masked_mean(values, mask).item() == 2.0
    assert masked_mean(values).item() == 3.5
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \[2, 3\]"):
        masked_mean(values, mask.float())
    with pytest.raises(ValueError, match=r"ref_log_probs must have the shape of log_probs \[3\], got \[2\]"):
        kl_k3(torch.zeros(3), torch.zeros(2))
