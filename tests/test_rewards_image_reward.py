"""ImageRewardScorer on a tiny random checkpoint written in the official ImageReward key layout.

The reference forward below re-implements the original code with plain torch operations. It covers the
timm-style ViT in BLIP, the BLIP "med" BERT encoder with cross-attention, the MLP head and the
normalisation, and shares no code with the transformers modules that the scorer runs on.
"""

from __future__ import annotations

import json
import logging
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from cogrpo_lightning.rewards._blip import (  # noqa: E402
    CheckpointLayoutError,
    ImageRewardNetwork,
    convert_official_state_dict,
    text_config_from_med_config,
    vision_config_from_checkpoint,
)
from cogrpo_lightning.rewards.image_reward import (  # noqa: E402
    MAX_PROMPT_TOKENS,
    ImageRewardScorer,
    preprocess_images,
)

VISION_WIDTH, VISION_DEPTH, VISION_HEADS, PATCH, IMAGE_SIZE = 64, 2, 4, 8, 32
TEXT_WIDTH, TEXT_DEPTH, TEXT_HEADS, TEXT_INTERMEDIATE, MAX_POSITIONS = 32, 2, 4, 64, 40
WORDS = "a an the red blue green cat dog bird on under near big small photo of painting sky tree".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s"]
MED_CONFIG = {
    "architectures": ["BertModel"],
    "hidden_act": "gelu",
    "hidden_size": TEXT_WIDTH,
    "intermediate_size": TEXT_INTERMEDIATE,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": MAX_POSITIONS,
    "model_type": "bert",
    "num_attention_heads": TEXT_HEADS,
    "num_hidden_layers": TEXT_DEPTH,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": len(VOCAB) + 2,  # BLIP adds [DEC] and [ENC] to the BERT vocabulary
    "encoder_width": 768,
    "add_cross_attention": True,
}
LONG_PROMPT = " ".join(["a big red cat on a small blue tree"] * 6)
PROMPTS = ["a red cat", "a photo of a dog under the sky", LONG_PROMPT, ""]
PROJECTION_KEYS = {
    f"blip.{encoder}_proj.{part}" for encoder in ("vision", "text") for part in ("weight", "bias")
}
IGNORED_KEYS = PROJECTION_KEYS | {"blip.text_encoder.embeddings.position_ids"}


def official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the names and shapes of the official ImageReward / BLIP modules."""
    generator = torch.Generator().manual_seed(seed)

    def linear(prefix: str, out_features: int, in_features: int) -> dict[str, torch.Tensor]:
        weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
        return {
            f"{prefix}.weight": weight,
            f"{prefix}.bias": 0.1 * torch.randn(out_features, generator=generator),
        }

    def layer_norm(prefix: str, width: int) -> dict[str, torch.Tensor]:
        weight = 1.0 + 0.2 * torch.randn(width, generator=generator)
        return {f"{prefix}.weight": weight, f"{prefix}.bias": 0.1 * torch.randn(width, generator=generator)}

    state: dict[str, torch.Tensor] = {}
    vit = "blip.visual_encoder"
    num_positions = (IMAGE_SIZE // PATCH) ** 2 + 1
    state[f"{vit}.cls_token"] = 0.5 * torch.randn(1, 1, VISION_WIDTH, generator=generator)
    state[f"{vit}.pos_embed"] = 0.5 * torch.randn(1, num_positions, VISION_WIDTH, generator=generator)
    state[f"{vit}.patch_embed.proj.weight"] = (
        torch.randn(VISION_WIDTH, 3, PATCH, PATCH, generator=generator) / (3 * PATCH * PATCH) ** 0.5
    )
    state[f"{vit}.patch_embed.proj.bias"] = 0.1 * torch.randn(VISION_WIDTH, generator=generator)
    for i in range(VISION_DEPTH):
        block = f"{vit}.blocks.{i}"
        state |= layer_norm(f"{block}.norm1", VISION_WIDTH)
        state |= linear(f"{block}.attn.qkv", 3 * VISION_WIDTH, VISION_WIDTH)
        state |= linear(f"{block}.attn.proj", VISION_WIDTH, VISION_WIDTH)
        state |= layer_norm(f"{block}.norm2", VISION_WIDTH)
        state |= linear(f"{block}.mlp.fc1", 4 * VISION_WIDTH, VISION_WIDTH)
        state |= linear(f"{block}.mlp.fc2", VISION_WIDTH, 4 * VISION_WIDTH)
    state |= layer_norm(f"{vit}.norm", VISION_WIDTH)

    text = "blip.text_encoder"
    state[f"{text}.embeddings.position_ids"] = torch.arange(MAX_POSITIONS).expand(1, -1).clone()
    state[f"{text}.embeddings.word_embeddings.weight"] = torch.randn(
        MED_CONFIG["vocab_size"], TEXT_WIDTH, generator=generator
    )
    state[f"{text}.embeddings.position_embeddings.weight"] = torch.randn(
        MAX_POSITIONS, TEXT_WIDTH, generator=generator
    )
    state |= layer_norm(f"{text}.embeddings.LayerNorm", TEXT_WIDTH)
    for i in range(TEXT_DEPTH):
        layer = f"{text}.encoder.layer.{i}"
        for block, key_width in (("attention", TEXT_WIDTH), ("crossattention", VISION_WIDTH)):
            state |= linear(f"{layer}.{block}.self.query", TEXT_WIDTH, TEXT_WIDTH)
            state |= linear(f"{layer}.{block}.self.key", TEXT_WIDTH, key_width)
            state |= linear(f"{layer}.{block}.self.value", TEXT_WIDTH, key_width)
            state |= linear(f"{layer}.{block}.output.dense", TEXT_WIDTH, TEXT_WIDTH)
            state |= layer_norm(f"{layer}.{block}.output.LayerNorm", TEXT_WIDTH)
        state |= linear(f"{layer}.intermediate.dense", TEXT_INTERMEDIATE, TEXT_WIDTH)
        state |= linear(f"{layer}.output.dense", TEXT_WIDTH, TEXT_INTERMEDIATE)
        state |= layer_norm(f"{layer}.output.LayerNorm", TEXT_WIDTH)

    state |= linear("blip.vision_proj", 256, VISION_WIDTH)
    state |= linear("blip.text_proj", 256, TEXT_WIDTH)
    head_shapes = {0: (1024, TEXT_WIDTH), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}
    for index, (out_features, in_features) in head_shapes.items():
        state |= linear(f"mlp.layers.{index}", out_features, in_features)
    return state


def write_checkpoint_dir(directory, state: dict[str, torch.Tensor]):
    torch.save(state, directory / "ImageReward.pt")
    (directory / "med_config.json").write_text(json.dumps(MED_CONFIG))
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return directory


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return write_checkpoint_dir(tmp_path_factory.mktemp("image_reward"), official_state_dict())


@pytest.fixture(scope="module")
def scorer(checkpoint_dir):
    return ImageRewardScorer.from_pretrained(checkpoint_dir, vision_num_heads=VISION_HEADS)


def random_images(count: int, size: int = IMAGE_SIZE, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference_attention(query, key, value, heads, additive_mask=None):
    batch, query_len, width = query.shape
    head_dim = width // heads
    q = query.view(batch, query_len, heads, head_dim).transpose(1, 2)
    k = key.view(batch, key.shape[1], heads, head_dim).transpose(1, 2)
    v = value.view(batch, value.shape[1], heads, head_dim).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / head_dim**0.5
    if additive_mask is not None:
        scores = scores + additive_mask
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, query_len, width)


def reference_reward(state, pixels, input_ids, attention_mask):
    """ImageReward forward written from the original BLIP/ImageReward code."""

    def lin(x, prefix):
        return F.linear(x, state[f"{prefix}.weight"], state[f"{prefix}.bias"])

    def norm(x, prefix, eps):
        return F.layer_norm(x, x.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps)

    vit = "blip.visual_encoder"
    x = F.conv2d(
        pixels, state[f"{vit}.patch_embed.proj.weight"], state[f"{vit}.patch_embed.proj.bias"], stride=PATCH
    )
    x = x.flatten(2).transpose(1, 2)
    x = (
        torch.cat([state[f"{vit}.cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
        + state[f"{vit}.pos_embed"]
    )
    for i in range(VISION_DEPTH):
        block = f"{vit}.blocks.{i}"
        qkv = lin(norm(x, f"{block}.norm1", 1e-6), f"{block}.attn.qkv")
        q, k, v = qkv.split(VISION_WIDTH, dim=-1)
        x = x + lin(reference_attention(q, k, v, VISION_HEADS), f"{block}.attn.proj")
        hidden = F.gelu(lin(norm(x, f"{block}.norm2", 1e-6), f"{block}.mlp.fc1"))
        x = x + lin(hidden, f"{block}.mlp.fc2")
    image_embeds = norm(x, f"{vit}.norm", 1e-6)

    text = "blip.text_encoder"
    positions = torch.arange(input_ids.shape[1])
    h = state[f"{text}.embeddings.word_embeddings.weight"][input_ids]
    h = h + state[f"{text}.embeddings.position_embeddings.weight"][positions]
    h = norm(h, f"{text}.embeddings.LayerNorm", 1e-12)
    self_mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
    for i in range(TEXT_DEPTH):
        layer = f"{text}.encoder.layer.{i}"
        for block, source, mask in (("attention", None, self_mask), ("crossattention", image_embeds, None)):
            source = h if source is None else source
            context = reference_attention(
                lin(h, f"{layer}.{block}.self.query"),
                lin(source, f"{layer}.{block}.self.key"),
                lin(source, f"{layer}.{block}.self.value"),
                TEXT_HEADS,
                mask,
            )
            h = norm(
                lin(context, f"{layer}.{block}.output.dense") + h, f"{layer}.{block}.output.LayerNorm", 1e-12
            )
        hidden = F.gelu(lin(h, f"{layer}.intermediate.dense"))
        h = norm(lin(hidden, f"{layer}.output.dense") + h, f"{layer}.output.LayerNorm", 1e-12)

    features = h[:, 0, :]
    for index in (0, 2, 4, 6, 7):
        features = lin(features, f"mlp.layers.{index}")
    return (features.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def reference_tokens(checkpoint_dir, prompts):
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(checkpoint_dir))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    encoded = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def test_converter_maps_every_key():
    state = official_state_dict()
    vision_config = vision_config_from_checkpoint(state, num_heads=VISION_HEADS)
    network = ImageRewardNetwork(vision_config, text_config_from_med_config(MED_CONFIG, VISION_WIDTH))

    converted = convert_official_state_dict(state, network)

    assert set(converted) == set(network.state_dict())
    assert len(converted) + len(IGNORED_KEYS) == len(state)
    used = {id(tensor) for tensor in converted.values()}
    leftovers = {key for key, tensor in state.items() if id(tensor) not in used}
    assert leftovers == IGNORED_KEYS
    assert vision_config.image_size == IMAGE_SIZE
    assert vision_config.num_hidden_layers == VISION_DEPTH


def test_score_matches_reference_forward(scorer, checkpoint_dir):
    state = official_state_dict()
    images = random_images(len(PROMPTS))
    input_ids, attention_mask = reference_tokens(checkpoint_dir, PROMPTS)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

    expected = reference_reward(state, (images - mean) / std, input_ids, attention_mask)
    scores = scorer(images, PROMPTS)

    assert scores.dtype == torch.float32
    assert torch.allclose(scores, expected, atol=1e-4, rtol=0), (scores, expected)
    assert float(expected.max() - expected.min()) > 0.1, "the test weights give nearly equal rewards"
    assert (input_ids[:, 0] == VOCAB.index("[CLS]")).all(), "the original keeps [CLS] as the first token"


def test_batch_equals_one_at_a_time(scorer, checkpoint_dir):
    images = random_images(len(PROMPTS), seed=2)
    batched = scorer(images, PROMPTS)
    single = torch.cat([scorer(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(len(PROMPTS))])
    chunked = ImageRewardScorer.from_pretrained(checkpoint_dir, vision_num_heads=VISION_HEADS, batch_size=3)

    assert torch.allclose(batched, single, atol=1e-4, rtol=0)
    assert torch.allclose(chunked(images, PROMPTS), single, atol=1e-4, rtol=0)


def test_truncation_logged_once_per_scorer(checkpoint_dir, caplog):
    images = random_images(2)
    prompts = [LONG_PROMPT, "a cat"]
    caplog.set_level(logging.WARNING, logger="cogrpo_lightning.rewards.base")

    first = ImageRewardScorer.from_pretrained(checkpoint_dir, vision_num_heads=VISION_HEADS)
    first(images, prompts)
    first(images, prompts)
    records = [record for record in caplog.records if "truncated" in record.getMessage()]
    assert len(records) == 1
    assert f"limit of {MAX_PROMPT_TOKENS} tokens" in records[0].getMessage()
    assert "ImageRewardScorer" in records[0].getMessage()
    assert first.truncated_prompt_count == 2

    second = ImageRewardScorer.from_pretrained(checkpoint_dir, vision_num_heads=VISION_HEADS)
    second(images[:1], prompts[:1])
    records = [record for record in caplog.records if "truncated" in record.getMessage()]
    assert len(records) == 2


def test_long_prompt_scores_as_truncated(scorer):
    words = LONG_PROMPT.split()
    truncated_prompt = " ".join(
        words[: MAX_PROMPT_TOKENS - 2]
    )  # [CLS] and [SEP] take two of the 35 positions
    images = random_images(1, seed=3).expand(2, -1, -1, -1)

    scores = scorer(images, [LONG_PROMPT, truncated_prompt])

    assert torch.allclose(scores[0], scores[1], atol=1e-6)


def test_missing_key_is_named(tmp_path):
    state = official_state_dict()
    del state["blip.visual_encoder.blocks.1.attn.qkv.bias"]
    write_checkpoint_dir(tmp_path, state)

    with pytest.raises(
        CheckpointLayoutError, match=r"missing keys \(1\): blip\.visual_encoder\.blocks\.1\.attn\.qkv\.bias"
    ):
        ImageRewardScorer.from_pretrained(tmp_path, vision_num_heads=VISION_HEADS)


def test_unexpected_key_is_named(tmp_path):
    state = official_state_dict()
    state["blip.text_encoder.pooler.dense.weight"] = torch.zeros(TEXT_WIDTH, TEXT_WIDTH)
    write_checkpoint_dir(tmp_path, state)

    with pytest.raises(
        CheckpointLayoutError, match=r"unexpected keys \(1\): blip\.text_encoder\.pooler\.dense\.weight"
    ):
        ImageRewardScorer.from_pretrained(tmp_path, vision_num_heads=VISION_HEADS)


def test_shape_mismatch_is_named(checkpoint_dir):
    med_config = dict(MED_CONFIG, vocab_size=MED_CONFIG["vocab_size"] + 1)

    with pytest.raises(CheckpointLayoutError, match=r"word_embeddings\.weight has shape") as raised:
        ImageRewardScorer(
            checkpoint_dir / "ImageReward.pt",
            med_config=med_config,
            tokenizer=str(checkpoint_dir),
            vision_num_heads=VISION_HEADS,
        )
    assert raised.value.missing == []


def test_checkpoint_file_with_med_config_dict(scorer, checkpoint_dir):
    from_file = ImageRewardScorer(
        checkpoint_dir / "ImageReward.pt",
        med_config=MED_CONFIG,
        tokenizer=str(checkpoint_dir),
        vision_num_heads=VISION_HEADS,
    )
    images = random_images(2, seed=4)

    assert torch.equal(from_file(images, PROMPTS[:2]), scorer(images, PROMPTS[:2]))
    assert not any(parameter.requires_grad for parameter in from_file.parameters())


def test_missing_local_checkpoint_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        ImageRewardScorer(str(tmp_path / "absent" / "ImageReward.pt"))
    with pytest.raises(FileNotFoundError, match="ImageReward.pt not found in the checkpoint directory"):
        ImageRewardScorer.from_pretrained(tmp_path)


def test_dtype_follows_module(scorer, checkpoint_dir):
    images = random_images(2, seed=5)
    expected = scorer(images, PROMPTS[:2])
    double = ImageRewardScorer.from_pretrained(
        checkpoint_dir, vision_num_heads=VISION_HEADS, dtype=torch.float64
    )

    scores = double(images, PROMPTS[:2])

    assert next(double.parameters()).dtype == torch.float64
    assert scores.dtype == torch.float32
    assert torch.allclose(scores, expected, atol=1e-4, rtol=0)


def test_nonfinite_image_scores_nan(scorer):
    images = random_images(3, seed=6)
    clean = scorer(images, PROMPTS[:3])
    images[1, 0, 0, 0] = float("nan")

    scores = scorer(images, PROMPTS[:3])

    assert torch.isnan(scores[1])
    assert torch.allclose(scores[[0, 2]], clean[[0, 2]], atol=1e-6)
    assert scorer(images[:0], []).shape == (0,)


def test_preprocess_matches_pil_bicubic():
    from PIL import Image

    height, width = 40, 56
    ys = torch.linspace(0, 1, height).view(height, 1)
    xs = torch.linspace(0, 1, width).view(1, width)
    image = torch.stack(
        [0.5 + 0.4 * torch.sin(6 * xs + 2 * ys), xs * ys, 0.3 + 0.5 * ys * torch.ones_like(xs)]
    )
    image = (image * 255).round() / 255

    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    resized = Image.fromarray(array).resize((44, 32), Image.BICUBIC)  # shorter side 40 -> 32
    cropped = np.asarray(resized)[:, 6:38].astype(np.float32) / 255.0  # round((44 - 32) / 2) = 6
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    expected = torch.from_numpy((cropped - mean) / std).permute(2, 0, 1)

    result = preprocess_images(image[None], IMAGE_SIZE)[0]

    assert result.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert (result - expected).abs().max() < 3.0 / 255.0 / 0.26


def test_official_backend_without_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "ImageReward", None)

    with pytest.raises(ImportError, match="backend='transformers' needs only transformers"):
        ImageRewardScorer(backend="official")


def test_official_backend_scores_pil_images(monkeypatch, checkpoint_dir):
    calls: dict[str, list] = {"load": [], "score": []}

    class StubOfficialModel(torch.nn.Module):
        def score(self, prompt, image):
            calls["score"].append((prompt, image.size, image.mode))
            return float(len(prompt))

    def load(name, device):
        calls["load"].append((name, device))
        return StubOfficialModel()

    package = types.ModuleType("ImageReward")
    package.load = load
    monkeypatch.setitem(sys.modules, "ImageReward", package)

    scorer = ImageRewardScorer(checkpoint_dir, backend="official")
    scores = scorer(random_images(2), ["a cat", "a red dog"])

    assert calls["load"] == [(str(checkpoint_dir / "ImageReward.pt"), "cpu")]
    assert calls["score"] == [
        ("a cat", (IMAGE_SIZE, IMAGE_SIZE), "RGB"),
        ("a red dog", (IMAGE_SIZE, IMAGE_SIZE), "RGB"),
    ]
    assert scores.tolist() == [5.0, 9.0]


def test_hub_id_downloads_both_files(monkeypatch, checkpoint_dir):
    import huggingface_hub

    downloads = []

    def fake_hf_hub_download(repo_id, filename, **kwargs):
        downloads.append((repo_id, filename))
        return str(checkpoint_dir / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)

    ImageRewardScorer("THUDM/ImageReward", tokenizer=str(checkpoint_dir), vision_num_heads=VISION_HEADS)

    assert downloads == [("THUDM/ImageReward", "ImageReward.pt"), ("THUDM/ImageReward", "med_config.json")]
