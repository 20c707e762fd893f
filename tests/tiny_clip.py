"""Tiny CLIP models, tokenizer and an OpenCLIP reference forward for the reward tests.

No weights can be downloaded in the tests, so every model here is random and small. The OpenCLIP
forward below is written from OpenCLIP's architecture, independently of the converter under test.
Images: pre-LN blocks with fused q/k/v attention, class token, ln_pre, ln_post and ``proj``. Text:
the same blocks with a causal mask, ln_final, pooling at the argmax of the token ids and
``text_projection``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

WIDTH = 32
HEADS = 4
LAYERS = 2
MLP_WIDTH = 64
PATCH = 8
IMAGE_SIZE = 32
CONTEXT = 77
EMBED_DIM = 16
# CLIP's image mean and std (OpenAI), written here again so that the tests do not reuse the code under test
CLIP_TEST_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_TEST_STD = (0.26862954, 0.26130258, 0.27577711)
WORDS = ["a", "cat", "dog", "red", "blue", "on", "the", "mat", "photo", "of"]


@contextmanager
def single_thread():
    """Run torch on one thread: the tiny models here are far too small to gain from more, and on a
    busy machine extra threads make each forward pass hundreds of times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _byte_characters() -> list[str]:
    # the 256 printable stand-ins for bytes used by byte-level BPE vocabularies such as CLIP's
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def build_tokenizer(directory: Path):
    """Save and return a CLIP BPE tokenizer laid out like CLIP's: bytes, bytes + </w>, merges, then
    <|startoftext|> and <|endoftext|> as the two highest ids."""
    from transformers import CLIPTokenizer

    characters = _byte_characters()
    vocab = {character: index for index, character in enumerate(characters)}
    for character in characters:
        vocab[character + "</w>"] = len(vocab)
    merges = []
    for word in WORDS:
        if len(word) < 2:
            continue
        merged = word[0]
        for position, character in enumerate(word[1:], start=1):
            suffix = "</w>" if position == len(word) - 1 else ""
            merges.append((merged, character + suffix))
            merged = merged + character + suffix
            vocab.setdefault(merged, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)))
    tokenizer.save_pretrained(directory)
    return tokenizer


def openclip_state_dict(vocab_size: int, seed: int = 0) -> dict[str, Tensor]:
    """Random weights with OpenCLIP's key names and shapes for a tiny ViT and text transformer."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float = 0.2) -> Tensor:
        return torch.randn(*shape, generator=generator) * std

    def norm_weight() -> Tensor:
        return 1.0 + normal(WIDTH, std=0.1)

    grid = IMAGE_SIZE // PATCH
    state = {
        "visual.conv1.weight": normal(WIDTH, 3, PATCH, PATCH, std=0.05),
        "visual.class_embedding": normal(WIDTH),
        "visual.positional_embedding": normal(grid * grid + 1, WIDTH),
        "visual.ln_pre.weight": norm_weight(),
        "visual.ln_pre.bias": normal(WIDTH, std=0.1),
        "visual.ln_post.weight": norm_weight(),
        "visual.ln_post.bias": normal(WIDTH, std=0.1),
        "visual.proj": normal(WIDTH, EMBED_DIM),
        "token_embedding.weight": normal(vocab_size, WIDTH),
        "positional_embedding": normal(CONTEXT, WIDTH, std=0.05),
        "ln_final.weight": norm_weight(),
        "ln_final.bias": normal(WIDTH, std=0.1),
        "text_projection": normal(WIDTH, EMBED_DIM),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
    }
    for tower in ("visual.", ""):
        for layer in range(LAYERS):
            prefix = f"{tower}transformer.resblocks.{layer}."
            state[prefix + "ln_1.weight"] = norm_weight()
            state[prefix + "ln_1.bias"] = normal(WIDTH, std=0.1)
            state[prefix + "attn.in_proj_weight"] = normal(3 * WIDTH, WIDTH)
            state[prefix + "attn.in_proj_bias"] = normal(3 * WIDTH, std=0.1)
            state[prefix + "attn.out_proj.weight"] = normal(WIDTH, WIDTH)
            state[prefix + "attn.out_proj.bias"] = normal(WIDTH, std=0.1)
            state[prefix + "ln_2.weight"] = norm_weight()
            state[prefix + "ln_2.bias"] = normal(WIDTH, std=0.1)
            state[prefix + "mlp.c_fc.weight"] = normal(MLP_WIDTH, WIDTH)
            state[prefix + "mlp.c_fc.bias"] = normal(MLP_WIDTH, std=0.1)
            state[prefix + "mlp.c_proj.weight"] = normal(WIDTH, MLP_WIDTH)
            state[prefix + "mlp.c_proj.bias"] = normal(WIDTH, std=0.1)
    return state


def _layer_norm(x: Tensor, state: dict[str, Tensor], name: str) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), state[name + ".weight"], state[name + ".bias"], eps=1e-5)


def _block(x: Tensor, state: dict[str, Tensor], prefix: str, mask: Tensor | None) -> Tensor:
    batch, length, width = x.shape
    head_dim = width // HEADS
    hidden = _layer_norm(x, state, prefix + "ln_1")
    qkv = hidden @ state[prefix + "attn.in_proj_weight"].T + state[prefix + "attn.in_proj_bias"]
    query, key, value = (part.reshape(batch, length, HEADS, head_dim).transpose(1, 2) for part in qkv.chunk(3, -1))
    logits = query @ key.transpose(-1, -2) / math.sqrt(head_dim)  # [B, H, L, L]
    if mask is not None:
        logits = logits + mask
    attended = (logits.softmax(dim=-1) @ value).transpose(1, 2).reshape(batch, length, width)
    x = x + attended @ state[prefix + "attn.out_proj.weight"].T + state[prefix + "attn.out_proj.bias"]
    hidden = _layer_norm(x, state, prefix + "ln_2")
    hidden = F.gelu(hidden @ state[prefix + "mlp.c_fc.weight"].T + state[prefix + "mlp.c_fc.bias"])
    return x + hidden @ state[prefix + "mlp.c_proj.weight"].T + state[prefix + "mlp.c_proj.bias"]


def openclip_image_features(state: dict[str, Tensor], pixels: Tensor) -> Tensor:
    """OpenCLIP ``encode_image`` on normalised pixels [N, 3, 32, 32] -> [N, EMBED_DIM] (not normalised)."""
    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=PATCH)  # [N, D, g, g]
    x = x.flatten(2).transpose(1, 2)  # [N, g*g, D]
    cls = state["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + state["visual.positional_embedding"]
    x = _layer_norm(x, state, "visual.ln_pre")
    for layer in range(LAYERS):
        x = _block(x, state, f"visual.transformer.resblocks.{layer}.", None)
    x = _layer_norm(x, state, "visual.ln_post")
    return x[:, 0] @ state["visual.proj"]


def openclip_tokenize(tokenizer, prompts: list[str]) -> Tensor:
    """OpenCLIP's tokenisation rule: [sot] + tokens + [eot], cut to 77 with eot last, zero padded."""
    rows = []
    for prompt in prompts:
        ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        ids = ids[:CONTEXT]
        ids[-1] = tokenizer.eos_token_id
        rows.append(ids + [0] * (CONTEXT - len(ids)))
    return torch.tensor(rows)


def openclip_text_features(state: dict[str, Tensor], ids: Tensor) -> Tensor:
    """OpenCLIP ``encode_text`` on token ids [N, 77] -> [N, EMBED_DIM] (not normalised)."""
    x = state["token_embedding.weight"][ids] + state["positional_embedding"]
    mask = torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)
    for layer in range(LAYERS):
        x = _block(x, state, f"transformer.resblocks.{layer}.", mask)
    x = _layer_norm(x, state, "ln_final")
    return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ state["text_projection"]


def save_clip_model(directory: Path, tokenizer, hidden_act: str = "gelu", seed: int = 0):
    """Save a random tiny transformers CLIPModel (with the tokenizer) to ``directory`` and return it."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    shared = {
        "hidden_size": WIDTH,
        "intermediate_size": MLP_WIDTH,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "hidden_act": hidden_act,
    }
    text_config = {
        **shared,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": CONTEXT,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {**shared, "image_size": IMAGE_SIZE, "patch_size": PATCH}
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=EMBED_DIM)
    model = CLIPModel(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def smooth_images(num_images: int, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE, seed: int = 0) -> Tensor:
    """Float images [N, 3, H, W] in [0, 1] on the uint8 grid (k / 255), smooth enough to resize."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_images, 3, 4, 4, generator=generator)
    images = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return (images * 255).round() / 255
