"""WeightedReward: both modes on hand-computed values, NaN and failure isolation, logging, YAML."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from tiny_clip import build_tokenizer, save_clip_model, single_thread, smooth_images

from cogrpo_lightning.rewards import CLIPScoreReward, RewardModel, WeightedReward, normalize_per_group

nan = math.nan


class TableReward(RewardModel):
    """Return fixed scores by prompt; raise for the prompts in ``failing``."""

    def __init__(self, table: dict[str, float], failing: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.table = table
        self.failing = failing
        self.calls = 0

    def score(self, images, prompts, metadata):
        self.calls += 1
        bad = [prompt for prompt in prompts if prompt in self.failing]
        if bad:
            raise RuntimeError(f"cannot score {bad}")
        return torch.tensor([self.table[prompt] for prompt in prompts])


def images_for(num_images: int) -> torch.Tensor:
    return torch.rand(num_images, 3, 8, 8)


def test_sum_then_normalize_weights_raw_scores():
    first = TableReward({"a": 1.0, "b": 2.0})
    second = TableReward({"a": 10.0, "b": -4.0})
    combined = WeightedReward({"first": first, "second": second}, weights={"second": 0.5})

    total = combined(images_for(2), ["a", "b"])

    # first weighs 1.0 by default: [1 + 0.5 * 10, 2 + 0.5 * -4]
    torch.testing.assert_close(total, torch.tensor([6.0, 0.0]))
    torch.testing.assert_close(combined.last_components["second"], torch.tensor([10.0, -4.0]))


def test_normalize_then_sum_hand_computed():
    # group_size 2, prompts x (samples 0-1) and y (samples 2-3), scores keyed by a sample tag
    first = TableReward({"x0": 1.0, "x1": 3.0, "y0": 5.0, "y1": 5.0})
    second = TableReward({"x0": 10.0, "x1": 20.0, "y0": 0.0, "y1": 40.0})

    class ByTag(RewardModel):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def score(self, images, prompts, metadata):
            return self.inner.score(images, [record["tag"] for record in metadata], metadata)

    combined = WeightedReward(
        {"first": ByTag(first), "second": ByTag(second)},
        weights=[1.0, 2.0],
        mode="normalize_then_sum",
        group_size=2,
        eps=0.0,
    )
    metadata = [{"tag": tag} for tag in ("x0", "x1", "y0", "y1")]

    total = combined(images_for(4), ["x", "x", "y", "y"], metadata)

    # first:  x: mean 2, std 1 -> [-1, 1];  y: equal values -> [0, 0]
    # second: x: mean 15, std 5 -> [-1, 1]; y: mean 20, std 20 -> [-1, 1]
    # total = first + 2 * second = [-3, 3, -2, 2]
    torch.testing.assert_close(total, torch.tensor([-3.0, 3.0, -2.0, 2.0]))


def test_normalize_per_group_ignores_nan():
    rewards = torch.tensor([1.0, nan, 0.0, 2.0, 4.0, 4.0, nan, nan])

    normalized = normalize_per_group(rewards, group_size=4, eps=0.0)

    # group 1: finite values 1, 0, 2 -> mean 1, population std sqrt(2/3)
    scale = math.sqrt(2 / 3)
    expected = torch.tensor([0.0, nan, -1 / scale, 1 / scale, 0.0, 0.0, nan, nan])
    torch.testing.assert_close(normalized, expected, equal_nan=True)


def test_failing_sample_gets_nan_and_logged_once(caplog):
    good = TableReward({"a": 1.0, "b": 2.0, "c": 3.0})
    flaky = TableReward({"a": 5.0, "b": 6.0, "c": 7.0}, failing=("c",))
    combined = WeightedReward({"good": good, "flaky": flaky})

    with caplog.at_level(logging.WARNING, logger="cogrpo_lightning.rewards"):
        total = combined(images_for(3), ["a", "b", "c"])
        again = combined(images_for(3), ["c", "a", "b"])

    torch.testing.assert_close(total, torch.tensor([6.0, 8.0, nan]), equal_nan=True)
    torch.testing.assert_close(again, torch.tensor([nan, 6.0, 8.0]), equal_nan=True)
    torch.testing.assert_close(combined.last_components["good"], torch.tensor([3.0, 1.0, 2.0]))
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert "reward 'flaky' raised RuntimeError on 1 of 3 samples (indices [2])" in message
    assert "cannot score ['c']" in message


def test_batch_failure_recovered_sample_by_sample(caplog):
    class BatchLimited(RewardModel):
        def score(self, images, prompts, metadata):
            if len(prompts) > 1:
                raise MemoryError("batch too large")
            return torch.ones(1)

    combined = WeightedReward({"limited": BatchLimited()})

    with caplog.at_level(logging.WARNING, logger="cogrpo_lightning.rewards"):
        total = combined(images_for(3), ["a", "b", "c"])

    torch.testing.assert_close(total, torch.ones(3))
    assert len(caplog.records) == 1
    assert "raised MemoryError on a batch of 3 samples but scored each sample alone" in caplog.records[0].getMessage()


def test_nan_component_makes_total_nan_unless_weight_zero():
    with_nan = TableReward({"a": nan, "b": 1.0})
    plain = TableReward({"a": 2.0, "b": 3.0})

    weighted = WeightedReward({"with_nan": with_nan, "plain": plain})
    logged_only = WeightedReward({"with_nan": with_nan, "plain": plain}, weights={"with_nan": 0.0})

    torch.testing.assert_close(weighted(images_for(2), ["a", "b"]), torch.tensor([nan, 4.0]), equal_nan=True)
    torch.testing.assert_close(logged_only(images_for(2), ["a", "b"]), torch.tensor([2.0, 3.0]))


def test_log_metrics_per_reward():
    combined = WeightedReward({"first": TableReward({"a": 1.0, "b": 3.0, "c": nan})})
    combined(images_for(3), ["a", "b", "c"])

    metrics = combined.log_metrics()

    assert metrics == {"rewards/first/mean": 2.0, "rewards/first/std": 1.0, "rewards/first/frac_nan": pytest.approx(1 / 3)}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "average"}, "mode must be one of sum_then_normalize, normalize_then_sum, got 'average'"),
        ({"weights": {"second": 1.0}}, r"weights name rewards that do not exist: \['second'\]"),
        ({"weights": [1.0, 2.0]}, r"got 2 weights for 1 rewards \['first'\]"),
        ({"group_size": 1}, "group_size must be at least 2"),
        ({"weights": [math.inf]}, "weights must be finite numbers"),
    ],
)
def test_invalid_options_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        WeightedReward({"first": TableReward({})}, **options)


def test_normalize_then_sum_checks_groups():
    reward = TableReward({"a": 1.0, "b": 2.0})
    without_group_size = WeightedReward({"first": reward}, mode="normalize_then_sum")
    grouped = WeightedReward({"first": reward}, mode="normalize_then_sum", group_size=2)

    with pytest.raises(ValueError, match="needs group_size"):
        without_group_size(images_for(2), ["a", "a"])
    with pytest.raises(ValueError, match="got 3 samples, not a multiple of group_size=2"):
        grouped(images_for(3), ["a", "a", "b"])
    with pytest.raises(ValueError, match="samples 0..1 have different prompts"):
        grouped(images_for(2), ["a", "b"])


def test_yaml_config_builds_weighted_reward(tmp_path):
    tokenizer = build_tokenizer(tmp_path / "clip")
    save_clip_model(tmp_path / "clip", tokenizer)
    config = f"""
model:
  group_size: 2
  reward:
    class_path: cogrpo_lightning.rewards.WeightedReward
    init_args:
      rewards:
        clip:
          class_path: cogrpo_lightning.rewards.CLIPScoreReward
          init_args:
            model: {tmp_path / "clip"}
        clip_again:
          class_path: cogrpo_lightning.rewards.CLIPScoreReward
          init_args:
            model: {tmp_path / "clip"}
      weights:
        clip_again: 0.25
      mode: normalize_then_sum
"""

    class Module:  # replaces the training module, which takes ``reward`` and ``group_size``
        def __init__(self, reward: RewardModel, group_size: int = 4) -> None:
            self.reward = reward

    parser = ArgumentParser()
    parser.add_class_arguments(Module, "model")
    parser.link_arguments("model.group_size", "model.reward.init_args.group_size")
    reward = parser.instantiate(parser.parse_string(config)).model.reward

    assert isinstance(reward, WeightedReward)
    assert reward.weights == {"clip": 1.0, "clip_again": 0.25}
    assert reward.mode == "normalize_then_sum"
    assert reward.group_size == 2
    assert isinstance(reward.rewards["clip"], CLIPScoreReward)
    with single_thread():
        total = reward(smooth_images(4), ["a cat", "a cat", "a dog", "a dog"])
    # each component normalises to -1 / +1 within a group (or 0 if equal): |total| <= 1.25
    assert bool((total.abs() <= 1.25 + 1e-4).all())


def test_yaml_list_form_names_by_class(tmp_path):
    tokenizer = build_tokenizer(tmp_path / "clip")
    save_clip_model(tmp_path / "clip", tokenizer)
    clip_block = f"""
    - class_path: cogrpo_lightning.rewards.CLIPScoreReward
      init_args:
        model: {tmp_path / "clip"}"""
    config = f"""
reward:
  class_path: cogrpo_lightning.rewards.WeightedReward
  init_args:
    rewards:{clip_block}{clip_block}
    weights: [1.0, 3.0]
"""
    parser = ArgumentParser()
    parser.add_argument("--reward", type=RewardModel)
    reward = parser.instantiate(parser.parse_string(config)).reward

    assert list(reward.rewards) == ["clip_score", "clip_score_2"]
    assert reward.weights == {"clip_score": 1.0, "clip_score_2": 3.0}


def test_shipped_reward_config_parses():
    path = Path(__file__).resolve().parents[1] / "configs" / "rewards" / "imagereward_hps21.yaml"
    parser = ArgumentParser()
    parser.add_argument("--reward", type=RewardModel)

    # parsing checks every class_path and init_args; building would download the checkpoints
    config = parser.parse_object({"reward": yaml.safe_load(path.read_text())})

    assert config.reward.class_path == "cogrpo_lightning.rewards.WeightedReward"
    assert config.reward.init_args.mode == "normalize_then_sum"
    assert config.reward.init_args.weights == {"image_reward": 1.0, "hps_v21": 1.0}
    assert config.reward.init_args.rewards["hps_v21"].init_args.version == "v2.1"
