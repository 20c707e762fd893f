"""Convert OpenCLIP ViT checkpoints (such as the HPS v2 ones) into a transformers ``CLIPModel``.

OpenCLIP's ``CLIP`` class (open_clip ``model.py`` and ``transformer.py``) stores the image tower under
``visual.`` and the text tower at the top level. Its transformer blocks are pre-LN
``ResidualAttentionBlock``s whose attention is ``torch.nn.MultiheadAttention``, with query, key and
value fused into ``in_proj_weight`` [3D, D] in that order. The projections are plain matrices
applied as ``x @ proj``, so they are the transpose of an ``nn.Linear`` weight. The map:

=============================================  ======================================================
OpenCLIP                                       transformers ``CLIPModel``
=============================================  ======================================================
visual.conv1.weight                            vision_model.embeddings.patch_embedding.weight
visual.class_embedding                         vision_model.embeddings.class_embedding
visual.positional_embedding                    vision_model.embeddings.position_embedding.weight
visual.ln_pre.*                                vision_model.pre_layrnorm.*
visual.transformer.resblocks.{i}.*             vision_model.encoder.layers.{i}.* (block map below)
visual.ln_post.*                               vision_model.post_layernorm.*
visual.proj [D, E]                             visual_projection.weight [E, D] (transposed)
token_embedding.weight                         text_model.embeddings.token_embedding.weight
positional_embedding                           text_model.embeddings.position_embedding.weight
transformer.resblocks.{i}.*                    text_model.encoder.layers.{i}.*
ln_final.*                                     text_model.final_layer_norm.*
text_projection [D, E]                         text_projection.weight [E, D] (transposed)
logit_scale                                    logit_scale
=============================================  ======================================================

Inside a block: ``ln_1`` -> ``layer_norm1``, ``attn.in_proj_{weight,bias}`` -> ``self_attn.{q,k,v}_proj``,
``attn.out_proj`` -> ``self_attn.out_proj``, ``ln_2`` -> ``layer_norm2``, ``mlp.c_fc`` -> ``mlp.fc1``,
``mlp.c_proj`` -> ``mlp.fc2``. OpenCLIP pools the image at the class token after ``ln_post`` and the
text at the end token after ``ln_final``, as transformers does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# OpenCLIP's causal mask is a buffer, not a weight, but old checkpoints may contain it.
IGNORED_OPENCLIP_KEYS = frozenset({"attn_mask"})

_TOP_LEVEL = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_BLOCK_KEY = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def load_openclip_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Load an OpenCLIP checkpoint file with ``weights_only=True`` and return its plain state dict.

    Accepts a bare state dict or one wrapped as ``{"state_dict": ...}`` (the HPS v2 files), and strips
    the ``module.`` prefix that DistributedDataParallel training leaves on every key.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} does not contain a state dict, found {type(checkpoint).__name__}")
    return {key.removeprefix("module."): value for key, value in checkpoint.items()}


def convert_openclip_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename and reshape OpenCLIP weights to transformers ``CLIPModel`` keys.

    Raises:
        ValueError: if any key is not covered by the map (listing those keys), so that a checkpoint
            of another architecture is never converted with weights silently dropped.
    """
    converted: dict[str, Tensor] = {}
    unmapped = []
    for key, value in state_dict.items():
        if key in IGNORED_OPENCLIP_KEYS:
            continue
        if key in _TOP_LEVEL:
            converted[_TOP_LEVEL[key]] = value
            continue
        if key in _TRANSPOSED:
            converted[_TRANSPOSED[key]] = value.t().contiguous()
            continue
        match = _BLOCK_KEY.match(key)
        if match is None:
            unmapped.append(key)
            continue
        tower = "vision_model" if match.group(1) else "text_model"
        prefix = f"{tower}.encoder.layers.{match.group(2)}"
        name = match.group(3)
        if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = name.rsplit("_", 1)[1]
            query, key_part, value_part = value.chunk(3, dim=0)  # [3D, ...] -> 3 x [D, ...]
            converted[f"{prefix}.self_attn.q_proj.{kind}"] = query.contiguous()
            converted[f"{prefix}.self_attn.k_proj.{kind}"] = key_part.contiguous()
            converted[f"{prefix}.self_attn.v_proj.{kind}"] = value_part.contiguous()
            continue
        module, _, kind = name.rpartition(".")
        if module in _BLOCK and kind in ("weight", "bias"):
            converted[f"{prefix}.{_BLOCK[module]}.{kind}"] = value
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(
            f"{len(unmapped)} OpenCLIP keys have no transformers CLIPModel counterpart: {sorted(unmapped)[:10]}; "
            "only OpenCLIP ViT models with the built-in text transformer (such as ViT-H-14) can be converted"
        )
    return converted


def _count_layers(state_dict: Mapping[str, Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
    indices = {int(match.group(1)) for key in state_dict if (match := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def clip_config_from_openclip(
    state_dict: Mapping[str, Tensor],
    vision_heads: int,
    text_heads: int,
    hidden_act: str = "gelu",
    **text_token_ids: int,
) -> Any:
    """Build a ``CLIPConfig`` whose shapes match an OpenCLIP state dict.

    Widths, depths, patch size, image size, vocabulary, context length and projection size are read
    from the tensor shapes. Head counts and the activation are not stored in the weights, so they are
    arguments: ViT-H-14 has 16 heads in both towers (vision width 1280 / head width 80, text width
    1024 / 64) and exact GELU (``"gelu"``); OpenAI-pretrained models use ``"quick_gelu"``.
    ``text_token_ids`` (``eos_token_id``, ``bos_token_id``, ``pad_token_id``) go to the text config.
    """
    from transformers import CLIPConfig

    conv = state_dict["visual.conv1.weight"]  # [width, 3, patch, patch]
    vision_width, patch_size = conv.shape[0], conv.shape[-1]
    num_positions = state_dict["visual.positional_embedding"].shape[0]
    grid = round((num_positions - 1) ** 0.5)
    if grid * grid != num_positions - 1:
        raise ValueError(f"visual.positional_embedding has {num_positions} rows, expected a square grid + 1")
    token_embedding = state_dict["token_embedding.weight"]  # [vocab, width]
    text_width = token_embedding.shape[1]
    for name, width, heads in (("vision_heads", vision_width, vision_heads), ("text_heads", text_width, text_heads)):
        if heads < 1 or width % heads != 0:
            raise ValueError(f"{name}={heads} does not divide the tower width {width}")

    vision_config = {
        "hidden_size": vision_width,
        "intermediate_size": state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": _count_layers(state_dict, "visual."),
        "num_attention_heads": vision_heads,
        "image_size": grid * patch_size,
        "patch_size": patch_size,
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
    }
    text_config = {
        "vocab_size": token_embedding.shape[0],
        "hidden_size": text_width,
        "intermediate_size": state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": _count_layers(state_dict, ""),
        "num_attention_heads": text_heads,
        "max_position_embeddings": state_dict["positional_embedding"].shape[0],
        "hidden_act": hidden_act,
        "layer_norm_eps": 1e-5,
        **text_token_ids,
    }
    projection_dim = state_dict["visual.proj"].shape[1]
    if state_dict["text_projection"].shape[1] != projection_dim:
        raise ValueError("visual.proj and text_projection project to different sizes")
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim)


def openclip_to_transformers(
    state_dict: Mapping[str, Tensor],
    vision_heads: int,
    text_heads: int,
    hidden_act: str = "gelu",
    **text_token_ids: int,
) -> Any:
    """Convert an OpenCLIP state dict into a transformers ``CLIPModel`` (float32, eval mode).

    Raises:
        ValueError: if a source key is unmapped, or if the converted keys and the model's keys differ
            (missing or unexpected keys are listed), or if a shape does not match.
    """
    from transformers import CLIPModel

    config = clip_config_from_openclip(state_dict, vision_heads, text_heads, hidden_act, **text_token_ids)
    converted = convert_openclip_state_dict(state_dict)
    model = CLIPModel(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or unexpected:
        raise ValueError(f"conversion left CLIPModel keys missing: {missing[:10]}, unexpected: {unexpected[:10]}")
    model.load_state_dict({key: value.float() for key, value in converted.items()}, strict=True)
    return model.eval()
