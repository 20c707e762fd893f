"""ShapesGenEvalReward: correctness, partial credit and unscorable metadata."""

from __future__ import annotations

import logging
import math
import random

import pytest
import torch

from cogrpo_lightning.benchmarks.shapes.prompts import default_prompt_file, read_jsonl
from cogrpo_lightning.benchmarks.shapes.world import (
    IMAGE_SIZE,
    SceneObject,
    decode_tokens,
    render,
    sample_scene,
    scene_tokens,
)
from cogrpo_lightning.rewards.base import RewardModel
from cogrpo_lightning.rewards.shapes import ShapesGenEvalReward

TWO_CIRCLES = {
    "tag": "counting",
    "include": [{"class": "circle", "count": 2}],
    "exclude": [{"class": "circle", "count": 3}],
    "prompt": "a photo of two circles",
}
CIRCLE_RIGHT_OF_SQUARE = {
    "tag": "position",
    "include": [
        {"class": "square", "count": 1},
        {"class": "circle", "count": 1, "position": ["right of", 0]},
    ],
    "prompt": "a photo of a circle right of a square",
}


def three_circles() -> torch.Tensor:
    return render(
        [
            SceneObject("circle", "red", 0, 0),
            SceneObject("circle", "blue", 0, 3),
            SceneObject("circle", "green", 0, 6),
        ]
    )


def test_reward_contract():
    reward = ShapesGenEvalReward()
    assert isinstance(reward, RewardModel)
    assert reward.name == "shapes_geneval"
    assert reward.mode == "correct"
    assert "mode='correct'" in repr(reward)


def test_correct_mode_scores():
    images = torch.stack(
        [
            render([SceneObject("circle", "red", 0, 0), SceneObject("circle", "blue", 4, 4)]),
            three_circles(),
            torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE),
        ]
    )
    scores = ShapesGenEvalReward()(images, ["a photo of two circles"] * 3, [TWO_CIRCLES] * 3)
    assert scores.dtype == torch.float32
    assert scores.tolist() == [1.0, 0.0, 0.0]


def test_partial_mode_scores():
    # three circles satisfy the include clause and break the exclude clause: 1 of 2
    # a lone square satisfies the reference clause, and the circle is missing: 1 of 2
    lone_square = render([SceneObject("square", "red", 2, 2)])
    images = torch.stack([three_circles(), lone_square, torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE)])
    metadata = [TWO_CIRCLES, CIRCLE_RIGHT_OF_SQUARE, CIRCLE_RIGHT_OF_SQUARE]
    prompts = [record["prompt"] for record in metadata]
    scores = ShapesGenEvalReward(mode="partial")(images, prompts, metadata)
    assert scores.tolist() == [0.5, 0.5, 0.0]


def test_unusable_metadata_scores_nan(caplog):
    reward = ShapesGenEvalReward()
    images = torch.stack([three_circles()] * 5)
    metadata = [
        TWO_CIRCLES,
        {},
        {"tag": "counting", "prompt": "a photo of two circles"},
        {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
        {
            "tag": "colors",
            "include": [{"class": "circle", "count": 1, "color": "pink"}],
            "prompt": "a photo of a pink circle",
        },
    ]
    with caplog.at_level(logging.DEBUG, logger="cogrpo_lightning.rewards.shapes"):
        scores = reward(images, ["p"] * 5, metadata)
    assert scores[0].item() == 0.0
    assert all(math.isnan(value) for value in scores[1:].tolist())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "samples [1, 2, 3, 4]" in warnings[0].getMessage()
    assert "sample 1: metadata is missing" in warnings[0].getMessage()
    assert reward.num_unscorable == 4


def test_unusable_metadata_warns_once(caplog):
    reward = ShapesGenEvalReward()
    image = three_circles().unsqueeze(0)
    with caplog.at_level(logging.DEBUG, logger="cogrpo_lightning.rewards.shapes"):
        reward(image, ["p"], None)
        reward(image, ["p"], [{"tag": "colors", "include": [{"class": "cat", "count": 1}]}])
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING, logging.DEBUG]
    assert (
        "include[0].class 'cat' is not one of circle, square, triangle, cross"
        in caplog.records[1].getMessage()
    )
    assert reward.num_unscorable == 2


def test_invalid_mode_rejected():
    with pytest.raises(
        ValueError, match="unknown mode 'dense' for ShapesGenEvalReward; expected one of correct, partial"
    ):
        ShapesGenEvalReward(mode="dense")


def test_forward_validates_inputs():
    reward = ShapesGenEvalReward()
    with pytest.raises(ValueError, match="got 1 images but 2 prompts"):
        reward(three_circles().unsqueeze(0), ["a", "b"], [TWO_CIRCLES, TWO_CIRCLES])
    with pytest.raises(ValueError, match="images must be in \\[0, 1\\]"):
        reward(three_circles().unsqueeze(0) * 2, ["a"], [TWO_CIRCLES])


@pytest.mark.parametrize("mode", ["correct", "partial"])
def test_sampled_heldout_scenes_score_one(mode):
    records = read_jsonl(default_prompt_file("heldout"))
    reward = ShapesGenEvalReward(mode=mode)
    for seed in range(3):
        rng = random.Random(seed)
        images = decode_tokens(torch.stack([scene_tokens(sample_scene(record, rng)) for record in records]))
        scores = reward(images, [record["prompt"] for record in records], records)
        failed = [records[i]["prompt"] for i in range(len(records)) if scores[i].item() != 1.0]
        assert failed == [], f"seed {seed}"
