"""The ImageReward v1.0 network on transformers BLIP modules, and the converter from the official checkpoint.

The official model (github.com/THUDM/ImageReward, ``ImageReward/ImageReward.py`` and its BLIP copy) is a
timm-style ViT image encoder, the BLIP "med" BERT text encoder with a cross-attention sub-layer in every
layer, and a five-layer linear head. transformers ships the same two encoders as ``BlipVisionModel`` and
``BlipTextModel``, so this module builds those and renames the checkpoint keys to their layout.

This module imports transformers at the top. ``image_reward.py`` therefore imports this module only
when a scorer is built.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

# The official ImageReward.__init__ standardises raw head outputs with these constants
# (``self.mean`` and ``self.std``), and the scorer returns the standardised value.
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072

# Output widths of the Linear layers of the official head ``MLP(768)``. They sit at indices 0, 2, 4, 6
# and 7 of its nn.Sequential, with Dropout at 1, 3 and 5 and no activation in between.
HEAD_WIDTHS = (1024, 128, 64, 16, 1)
HEAD_LINEAR_INDICES = (0, 2, 4, 6, 7)

# The timm ViT in BLIP builds its LayerNorms with eps=1e-6.
VISION_LAYER_NORM_EPS = 1e-6

# Official name pattern -> name in ImageRewardNetwork, where ``{i}`` is a layer index. A pattern that
# ends with "." renames a prefix, and any other pattern is a whole key.
KEY_RENAMES: tuple[tuple[str, str], ...] = (
    ("blip.visual_encoder.cls_token", "vision.embeddings.class_embedding"),
    ("blip.visual_encoder.pos_embed", "vision.embeddings.position_embedding"),
    ("blip.visual_encoder.patch_embed.proj.", "vision.embeddings.patch_embedding."),
    ("blip.visual_encoder.blocks.{i}.norm1.", "vision.encoder.layers.{i}.layer_norm1."),
    ("blip.visual_encoder.blocks.{i}.attn.qkv.", "vision.encoder.layers.{i}.self_attn.qkv."),
    ("blip.visual_encoder.blocks.{i}.attn.proj.", "vision.encoder.layers.{i}.self_attn.projection."),
    ("blip.visual_encoder.blocks.{i}.norm2.", "vision.encoder.layers.{i}.layer_norm2."),
    ("blip.visual_encoder.blocks.{i}.mlp.", "vision.encoder.layers.{i}.mlp."),
    ("blip.visual_encoder.norm.", "vision.post_layernorm."),
    ("blip.text_encoder.", "text."),
    ("mlp.layers.", "head.layers."),
)

# Checkpoint entries that the reward does not use. The contrastive projections belong to BLIP
# pretraining, and position_ids is an arange buffer that transformers rebuilds as a non-persistent one.
IGNORED_KEY_PATTERNS: tuple[str, ...] = (
    r"blip\.vision_proj\.(weight|bias)",
    r"blip\.text_proj\.(weight|bias)",
    r"blip\.text_encoder\.embeddings\.position_ids",
)


class CheckpointLayoutError(ValueError):
    """An ImageReward checkpoint whose keys or shapes differ from the official layout."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str], mismatched: list[str]):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


def _compile_pattern(pattern: str) -> re.Pattern[str]:
    regex = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)")
    if not pattern.endswith("."):
        regex += "$"
    return re.compile(regex)


_OFFICIAL_TO_NETWORK = [(_compile_pattern(src), dst) for src, dst in KEY_RENAMES]
_NETWORK_TO_OFFICIAL = [(_compile_pattern(dst), src) for src, dst in KEY_RENAMES]
_IGNORED = [re.compile(pattern + "$") for pattern in IGNORED_KEY_PATTERNS]


def _rename(key: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in table:
        match = pattern.match(key)
        if match is None:
            continue
        new_prefix = template.replace("{i}", match.group("i")) if "{i}" in template else template
        return new_prefix + key[match.end() :]
    return None


def official_key_to_network(key: str) -> str | None:
    """Map an official ImageReward key to its ImageRewardNetwork name, or None when no rule matches."""
    return _rename(key, _OFFICIAL_TO_NETWORK)


def network_key_to_official(key: str) -> str | None:
    """Map an ImageRewardNetwork parameter name back to the official ImageReward key."""
    return _rename(key, _NETWORK_TO_OFFICIAL)


def _format_keys(keys: list[str], limit: int = 20) -> str:
    listed = ", ".join(keys[:limit])
    return listed if len(keys) <= limit else f"{listed}, ... ({len(keys) - limit} more)"


def vision_config_from_checkpoint(
    state_dict: Mapping[str, Tensor], num_heads: int | None = None
) -> BlipVisionConfig:
    """Build the BlipVisionConfig of the ViT stored in an official checkpoint from its tensor shapes.

    Width, depth, patch size, MLP width and image size follow from the shapes. The head count does not,
    so it defaults to width // 64, which gives the 16 heads of BLIP ViT-L and the 12 of ViT-B.
    """
    prefix = "blip.visual_encoder."
    required = [f"{prefix}cls_token", f"{prefix}pos_embed", f"{prefix}patch_embed.proj.weight"]
    absent = [key for key in required if key not in state_dict]
    if absent:
        raise CheckpointLayoutError(
            f"the checkpoint has no ViT image encoder in the official ImageReward layout: missing keys: "
            f"{_format_keys(absent)}",
            missing=absent,
            unexpected=[],
            mismatched=[],
        )

    width = state_dict[f"{prefix}cls_token"].shape[-1]
    patch_size = state_dict[f"{prefix}patch_embed.proj.weight"].shape[-1]
    num_patches = state_dict[f"{prefix}pos_embed"].shape[1] - 1
    grid = round(num_patches**0.5)
    if grid * grid != num_patches:
        raise ValueError(f"{prefix}pos_embed has {num_patches} patch positions, which is not a square grid")
    block_pattern = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.norm1\.weight$")
    depth = sum(1 for key in state_dict if block_pattern.match(key))
    fc1_key = f"{prefix}blocks.0.mlp.fc1.weight"
    intermediate_size = state_dict[fc1_key].shape[0] if fc1_key in state_dict else 4 * width

    if num_heads is None:
        num_heads = width // 64
    if num_heads < 1 or width % num_heads != 0:
        raise ValueError(f"vision_num_heads={num_heads} must be a positive divisor of the ViT width {width}")

    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=intermediate_size,
        num_hidden_layers=depth,
        num_attention_heads=num_heads,
        image_size=grid * patch_size,
        patch_size=patch_size,
        hidden_act="gelu",
        layer_norm_eps=VISION_LAYER_NORM_EPS,
        attention_dropout=0.0,
    )


def text_config_from_med_config(med_config: Mapping[str, Any], encoder_width: int) -> BlipTextConfig:
    """Build the BlipTextConfig of the BLIP text encoder described by ``med_config.json``.

    As in BLIP, ``encoder_width`` (the ViT width) replaces the file's ``encoder_width``. Dropout is set to
    zero because the scorer only runs inference, so a module left in train mode still scores
    deterministically.
    """
    required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"]
    absent = [name for name in required if name not in med_config]
    if absent:
        raise ValueError(f"med_config is missing the BERT fields {absent}")
    if not med_config.get("add_cross_attention", False):
        raise ValueError(
            "med_config must set add_cross_attention to true because ImageReward cross-attends to the image"
        )
    position_type = med_config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(
            f"med_config position_embedding_type={position_type!r} is not supported. Use 'absolute'."
        )

    return BlipTextConfig(
        vocab_size=int(med_config["vocab_size"]),
        hidden_size=int(med_config["hidden_size"]),
        encoder_hidden_size=encoder_width,
        intermediate_size=int(med_config["intermediate_size"]),
        num_hidden_layers=int(med_config["num_hidden_layers"]),
        num_attention_heads=int(med_config["num_attention_heads"]),
        max_position_embeddings=int(med_config.get("max_position_embeddings", 512)),
        hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=float(med_config.get("layer_norm_eps", 1e-12)),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=int(med_config.get("pad_token_id", 0)),
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,
        # transformers builds the cross-attention sub-layers only for a decoder config. The forward pass
        # sets is_decoder=False, so the self-attention stays bidirectional as in BLIP's text encoder.
        is_decoder=True,
        use_cache=False,
    )


class RewardHead(nn.Module):
    """The official five-layer linear head.

    Identity modules replace the original Dropout layers, so the layer indices match the checkpoint.
    """

    def __init__(self, in_features: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for index, out_features in zip(HEAD_LINEAR_INDICES, HEAD_WIDTHS, strict=True):
            while len(layers) < index:
                layers.append(nn.Identity())
            layers.append(nn.Linear(width, out_features))
            width = out_features
        self.layers = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)


class ImageRewardNetwork(nn.Module):
    """ImageReward v1.0: ViT image embeddings, BLIP text encoder cross-attending to them, linear head."""

    def __init__(self, vision_config: BlipVisionConfig, text_config: BlipTextConfig):
        super().__init__()
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = RewardHead(text_config.hidden_size)

    @property
    def image_size(self) -> int:
        return int(self.vision.config.image_size)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Compute the standardised reward [N] from normalised pixels [N, 3, S, S] and token ids [N, T]."""
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text_output = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        )
        features = text_output.last_hidden_state[:, 0, :]
        raw_reward = self.head(features).squeeze(-1)
        return (raw_reward - REWARD_MEAN) / REWARD_STD


def convert_official_state_dict(
    state_dict: Mapping[str, Tensor], network: ImageRewardNetwork
) -> dict[str, Tensor]:
    """Rename an official ImageReward state dict to ``network``'s keys, checking that nothing is left over.

    Raises:
        CheckpointLayoutError: when a network parameter has no checkpoint entry (missing), a checkpoint
            entry matches no network parameter and is not a known unused key (unexpected), or shapes
            differ. The message names the official keys.
    """
    expected = network.state_dict()
    converted: dict[str, Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    mismatched_targets: set[str] = set()

    for key, tensor in state_dict.items():
        if any(pattern.match(key) for pattern in _IGNORED):
            continue
        target = official_key_to_network(key)
        if target is None or target not in expected:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(expected[target].shape):
            mismatched.append(
                f"{key} has shape {list(tensor.shape)} in the checkpoint but the model expects "
                f"{list(expected[target].shape)}"
            )
            mismatched_targets.add(target)
            continue
        converted[target] = tensor

    missing = [
        network_key_to_official(key) or key
        for key in expected
        if key not in converted and key not in mismatched_targets
    ]

    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_format_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_format_keys(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {_format_keys(mismatched, limit=5)}")
        raise CheckpointLayoutError(
            "the checkpoint does not match the official ImageReward v1.0 layout for this med_config: "
            + "; ".join(parts),
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )
    return converted


def build_network(
    state_dict: Mapping[str, Tensor], med_config: Mapping[str, Any], vision_num_heads: int | None = None
) -> ImageRewardNetwork:
    """Build an ImageRewardNetwork in eval mode, frozen, with the weights of an official state dict."""
    vision_config = vision_config_from_checkpoint(state_dict, num_heads=vision_num_heads)
    text_config = text_config_from_med_config(med_config, encoder_width=vision_config.hidden_size)
    network = ImageRewardNetwork(vision_config, text_config)
    converted = convert_official_state_dict(state_dict, network)
    network.load_state_dict(converted, strict=True)
    network.eval()
    network.requires_grad_(False)
    return network
