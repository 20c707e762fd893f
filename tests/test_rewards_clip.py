"""CLIP-family scorers on tiny random models: conversion, formulas, preprocessing, batching, truncation."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_clip import (
    CLIP_TEST_MEAN,
    CLIP_TEST_STD,
    EMBED_DIM,
    HEADS,
    build_tokenizer,
    openclip_image_features,
    openclip_state_dict,
    openclip_text_features,
    openclip_tokenize,
    save_clip_model,
    single_thread,
    smooth_images,
)

from cogrpo_lightning.rewards import (
    AestheticReward,
    CLIPScoreReward,
    HPSv2Reward,
    PickScoreReward,
    convert_hps_checkpoint,
)
from cogrpo_lightning.rewards._clip import resize_center_crop, resize_longest_and_pad
from cogrpo_lightning.rewards.aesthetic import AestheticMLP
from cogrpo_lightning.rewards.openclip_convert import (
    convert_openclip_state_dict,
    load_openclip_state_dict,
    openclip_to_transformers,
)

PROMPTS = ["a red cat", "a blue dog on the mat", "a photo of a cat", "the dog"]
LONG_PROMPT = " ".join(["a red cat on the blue mat next to a dog"] * 12)  # 120 words


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_TEST_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_TEST_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tokenizer, OpenCLIP weights saved as an HPS-style checkpoint, and a tiny CLIPModel folder."""
    root = tmp_path_factory.mktemp("tiny_clip")
    tokenizer = build_tokenizer(root / "tokenizer")
    state = openclip_state_dict(len(tokenizer))
    torch.save({"state_dict": {f"module.{key}": value for key, value in state.items()}}, root / "hps.pt")
    clip = save_clip_model(root / "clip", tokenizer)
    return {"root": root, "tokenizer": tokenizer, "state": state, "clip": clip}


def make_hps(tiny, **options) -> HPSv2Reward:
    return HPSv2Reward(
        checkpoint=str(tiny["root"] / "hps.pt"),
        tokenizer=str(tiny["root"] / "tokenizer"),
        vision_heads=HEADS,
        text_heads=HEADS,
        **options,
    )


def test_converter_maps_every_key(tiny):
    converted = convert_openclip_state_dict(tiny["state"])
    model = openclip_to_transformers(tiny["state"], vision_heads=HEADS, text_heads=HEADS)

    assert set(converted) == set(model.state_dict())
    # fused q/k/v became three tensors, everything else one to one
    assert len(converted) == len(tiny["state"]) + 2 * 2 * 2 * 2


def test_converter_rejects_unknown_and_missing_keys(tiny):
    extra = dict(tiny["state"], **{"visual.attn_pool.query": torch.zeros(4, 32)})
    with pytest.raises(ValueError, match=r"no transformers CLIPModel counterpart: \['visual.attn_pool.query'\]"):
        convert_openclip_state_dict(extra)

    missing = {key: value for key, value in tiny["state"].items() if key != "ln_final.bias"}
    with pytest.raises(ValueError, match=r"missing: \['text_model.final_layer_norm.bias'\]"):
        openclip_to_transformers(missing, vision_heads=HEADS, text_heads=HEADS)

    with pytest.raises(ValueError, match="vision_heads=5 does not divide the tower width 32"):
        openclip_to_transformers(tiny["state"], vision_heads=5, text_heads=HEADS)


def test_checkpoint_loader_unwraps_state_dict(tiny):
    loaded = load_openclip_state_dict(tiny["root"] / "hps.pt")

    assert set(loaded) == set(tiny["state"])
    assert torch.equal(loaded["visual.proj"], tiny["state"]["visual.proj"])


def test_converted_model_matches_openclip_forward(tiny):
    model = openclip_to_transformers(
        tiny["state"], vision_heads=HEADS, text_heads=HEADS, eos_token_id=tiny["tokenizer"].eos_token_id
    )
    pixels = normalise(smooth_images(3))
    ids = openclip_tokenize(tiny["tokenizer"], PROMPTS[:3])

    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(input_ids=ids).pooler_output

    torch.testing.assert_close(image, openclip_image_features(tiny["state"], pixels), rtol=0, atol=1e-4)
    torch.testing.assert_close(text, openclip_text_features(tiny["state"], ids), rtol=0, atol=1e-4)


def test_hps_score_is_100_times_openclip_cosine(tiny):
    scorer = make_hps(tiny)
    images = smooth_images(4)
    ids = openclip_tokenize(tiny["tokenizer"], PROMPTS + [LONG_PROMPT])

    image = F.normalize(openclip_image_features(tiny["state"], normalise(images)), dim=-1)
    text = F.normalize(openclip_text_features(tiny["state"], ids), dim=-1)
    expected = 100 * (image * text[:4]).sum(-1)
    expected_long = 100 * (image[0] * text[4]).sum()

    torch.testing.assert_close(scorer(images, PROMPTS), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(scorer(images[:1], [LONG_PROMPT])[0], expected_long, rtol=0, atol=1e-4)
    torch.testing.assert_close(make_hps(tiny, scale=1.0)(images, PROMPTS), expected / 100, rtol=0, atol=1e-6)


def test_hps_converted_folder_gives_same_scores(tiny, tmp_path):
    folder = convert_hps_checkpoint(
        tiny["root"] / "hps.pt", tmp_path / "hps", tokenizer=str(tiny["root"] / "tokenizer"), vision_heads=4, text_heads=4
    )
    from_file = make_hps(tiny)
    from_folder = HPSv2Reward(checkpoint=str(folder), tokenizer=str(folder))
    images = smooth_images(4, seed=1)

    torch.testing.assert_close(from_folder(images, PROMPTS), from_file(images, PROMPTS), rtol=0, atol=1e-5)


def test_hps_missing_checkpoint_names_file(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="HPS_v2.1_compressed.pt"):
        make_hps(tiny | {"root": tmp_path})


def test_hps_official_backend_explains_missing_package(tiny):
    try:
        import hpsv2  # noqa: F401

        pytest.skip("hpsv2 is importable here")
    except Exception:
        pass
    with pytest.raises(ImportError, match="needs the hpsv2 package.*backend='transformers' needs only transformers"):
        make_hps(tiny, backend="official")


def test_pickscore_matches_model_card_formula(tiny):
    folder = str(tiny["root"] / "clip")
    scorer = PickScoreReward(model=folder, tokenizer=folder)
    model, tokenizer = tiny["clip"], tiny["tokenizer"]
    images = smooth_images(4, seed=2)

    # the PickScore model card: processor(padding=True, truncation=True, max_length=77), normalise,
    # then logit_scale.exp() * text_embs @ image_embs.T
    with torch.no_grad():
        image = model.get_image_features(pixel_values=normalise(images)).pooler_output
        inputs = tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text = model.get_text_features(**inputs).pooler_output
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    expected = model.logit_scale.exp() * (image * text).sum(-1)

    torch.testing.assert_close(scorer(images, PROMPTS), expected, rtol=0, atol=1e-4)


def test_clip_score_matches_torchmetrics_formula(tiny):
    from torchmetrics.functional.multimodal import clip_score
    from transformers import CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = str(tiny["root"] / "clip")
    scorer = CLIPScoreReward(model=folder)
    model = tiny["clip"]
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tiny["tokenizer"],
    )

    class TensorFeatures(torch.nn.Module):
        # torchmetrics 1.9 expects tensors from get_*_features, transformers 5 returns model outputs
        def __init__(self):
            super().__init__()
            self.config = model.config

        def get_image_features(self, pixel_values):
            return model.get_image_features(pixel_values=pixel_values).pooler_output

        def get_text_features(self, input_ids, attention_mask):
            return model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    images = smooth_images(4, seed=3)
    scores = scorer(images, PROMPTS)
    for index, prompt in enumerate(PROMPTS):
        # torchmetrics' processor rescales by 1/255, so it takes [0, 255] pixels
        reference = clip_score(images[index] * 255, [prompt], model_name_or_path=lambda: (TensorFeatures(), processor))
        torch.testing.assert_close(scores[index], reference.detach().float(), rtol=0, atol=1e-4)
    assert bool((scores >= 0).all())


def test_aesthetic_head_loads_official_layout():
    generator = torch.Generator().manual_seed(0)
    shapes = {0: (1024, 768), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}
    state = {}
    for index, (rows, columns) in shapes.items():
        state[f"layers.{index}.weight"] = torch.randn(rows, columns, generator=generator) / math.sqrt(columns)
        state[f"layers.{index}.bias"] = torch.randn(rows, generator=generator) * 0.1
    head = AestheticMLP(768)
    head.load_state_dict(state, strict=True)
    head.eval()
    embeddings = F.normalize(torch.randn(3, 768, generator=generator), dim=-1)

    expected = embeddings
    for index in shapes:  # the linearMSE head has no activations
        expected = expected @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]

    torch.testing.assert_close(head(embeddings), expected[:, 0], rtol=0, atol=1e-5)


def test_aesthetic_score_uses_normalised_image_embedding(tiny, tmp_path):
    head = AestheticMLP(EMBED_DIM)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    scorer = AestheticReward(clip_model=str(tiny["root"] / "clip"), head=str(tmp_path / "head.pth"))
    images = smooth_images(3, seed=4)

    with torch.no_grad():
        embedding = tiny["clip"].get_image_features(pixel_values=normalise(images)).pooler_output
        expected = head.eval()(F.normalize(embedding, dim=-1))

    torch.testing.assert_close(scorer(images, ["ignored"] * 3), expected, rtol=0, atol=1e-5)


def test_resize_matches_pil_bicubic():
    images = smooth_images(1, height=40, width=56, seed=5)
    array = (images[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    pil = Image.fromarray(array)

    # PIL/torchvision: shorter side to 32 (longer side int(32 * 56 / 40) = 44), centre crop
    resized = np.asarray(pil.resize((44, 32), Image.BICUBIC), dtype=np.float32) / 255
    expected_crop = torch.from_numpy(resized).permute(2, 0, 1)[:, :, 6:38]
    # hpsv2's ResizeMaxSize: longer side to 32 (shorter round(40 * 32 / 56) = 23), pad 4 above, 5 below
    resized = np.asarray(pil.resize((32, 23), Image.BICUBIC), dtype=np.float32) / 255
    expected_pad = F.pad(torch.from_numpy(resized).permute(2, 0, 1), (0, 0, 4, 5))

    torch.testing.assert_close(resize_center_crop(images, 32)[0], expected_crop, rtol=0, atol=5e-3)
    torch.testing.assert_close(resize_longest_and_pad(images, 32)[0], expected_pad, rtol=0, atol=5e-3)


@pytest.mark.parametrize("scorer_name", ["hps", "pickscore", "clip_score", "aesthetic"])
def test_batch_equals_one_at_a_time(tiny, tmp_path, scorer_name):
    folder = str(tiny["root"] / "clip")
    if scorer_name == "hps":
        scorer = make_hps(tiny)
    elif scorer_name == "pickscore":
        scorer = PickScoreReward(model=folder, tokenizer=folder)
    elif scorer_name == "clip_score":
        scorer = CLIPScoreReward(model=folder, max_batch_size=3)
    else:
        torch.save(AestheticMLP(EMBED_DIM).state_dict(), tmp_path / "head.pth")
        scorer = AestheticReward(clip_model=folder, head=str(tmp_path / "head.pth"))
    images = smooth_images(5, height=48, width=40, seed=6)  # resized and cropped or padded
    prompts = [*PROMPTS, LONG_PROMPT]

    batched = scorer(images, prompts)
    single = torch.cat([scorer(images[index : index + 1], prompts[index : index + 1]) for index in range(5)])

    torch.testing.assert_close(batched, single, rtol=0, atol=1e-4)


@pytest.mark.parametrize("scorer_name", ["hps", "pickscore", "clip_score"])
def test_long_prompt_truncation_logged_once(tiny, caplog, scorer_name):
    folder = str(tiny["root"] / "clip")
    scorers = {
        "hps": lambda: make_hps(tiny),
        "pickscore": lambda: PickScoreReward(model=folder, tokenizer=folder),
        "clip_score": lambda: CLIPScoreReward(model=folder),
    }
    first, second = scorers[scorer_name](), scorers[scorer_name]()
    images = smooth_images(2, seed=7)

    with caplog.at_level(logging.WARNING, logger="cogrpo_lightning.rewards"):
        first(images, ["a cat", "a dog"])
        assert not caplog.records
        for _ in range(3):
            first(images, [LONG_PROMPT, "a cat"])
        second(images, [LONG_PROMPT, LONG_PROMPT])

    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2, messages
    assert "limit of 77 tokens" in messages[0]
    assert type(first).__name__ in messages[0]
    assert "1 of 2 prompts" in messages[0]
    assert "2 of 2 prompts" in messages[1]
