"""The reward contract as the CLIP-family scorers and WeightedReward meet it: input range and dtype,
output dtype and shape, device and dtype of the module, frozen weights."""

from __future__ import annotations

import pytest
import torch
from tiny_clip import (
    HEADS,
    build_tokenizer,
    openclip_state_dict,
    save_clip_model,
    single_thread,
    smooth_images,
)

from cogrpo_lightning.rewards import (
    CLIPScoreReward,
    HPSv2Reward,
    PickScoreReward,
    RewardModel,
    WeightedReward,
    to_unit_range,
)

PROMPTS = ["a red cat", "a blue dog", "a cat on the mat"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def scorers(tmp_path_factory) -> dict[str, RewardModel]:
    root = tmp_path_factory.mktemp("contract")
    tokenizer = build_tokenizer(root / "clip")
    save_clip_model(root / "clip", tokenizer)
    torch.save({"state_dict": openclip_state_dict(len(tokenizer))}, root / "hps.pt")
    folder = str(root / "clip")
    hps = HPSv2Reward(checkpoint=str(root / "hps.pt"), tokenizer=folder, vision_heads=HEADS, text_heads=HEADS)
    return {
        "hps": hps,
        "clip_score": CLIPScoreReward(model=folder),
        "weighted": WeightedReward(
            {"hps": hps, "pickscore": PickScoreReward(model=folder, tokenizer=folder)}, weights=[1.0, 0.5]
        ),
    }


@pytest.fixture(params=["hps", "clip_score", "weighted"])
def scorer(request, scorers) -> RewardModel:
    return scorers[request.param]


def test_unit_range_float_accepted(scorer):
    scores = scorer(smooth_images(3), PROMPTS)

    assert scores.dtype == torch.float32
    assert scores.shape == (3,)
    assert bool(torch.isfinite(scores).all())


def test_minus_one_to_one_rejected_with_range(scorer):
    images = smooth_images(3)
    images[0, 0, 0, :2] = torch.tensor([0.0, 1.0])
    images = images * 2 - 1

    with pytest.raises(ValueError, match=r"must be in \[0, 1\], found values in \[-1, 1\].*to_unit_range"):
        scorer(images, PROMPTS)


def test_uint8_rejected_with_dtype(scorer):
    images = (smooth_images(3) * 255).round().to(torch.uint8)

    with pytest.raises(ValueError, match=r"must be float in \[0, 1\], got dtype torch.uint8.*'0-255'"):
        scorer(images, PROMPTS)


def test_to_unit_range_gives_same_scores(scorer):
    images = smooth_images(3)
    expected = scorer(images, PROMPTS)

    from_signed = scorer(to_unit_range(images * 2 - 1, "-1-1"), PROMPTS)
    from_uint8 = scorer(to_unit_range((images * 255).round().to(torch.uint8), "0-255"), PROMPTS)

    torch.testing.assert_close(from_signed, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(from_uint8, expected, rtol=0, atol=1e-4)


def test_prompt_count_mismatch_rejected(scorer):
    with pytest.raises(ValueError, match="got 3 images but 2 prompts"):
        scorer(smooth_images(3), PROMPTS[:2])


def test_module_dtype_followed(scorers):
    scorer = scorers["clip_score"]
    images = smooth_images(3)
    expected = scorer(images, PROMPTS)

    scorer.to(torch.float64)
    try:
        scores = scorer(images, PROMPTS)
    finally:
        scorer.to(torch.float32)

    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-4)


def test_train_mode_keeps_scorer_frozen(scorers):
    scorer = scorers["weighted"]
    scorer.train()

    for reward in scorer.rewards.values():
        assert not any(module.training for module in reward.modules())
    assert not any(parameter.requires_grad for parameter in scorer.parameters())
    with torch.enable_grad():
        assert not scorer(smooth_images(3), PROMPTS).requires_grad
