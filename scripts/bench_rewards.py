"""Measure the cost per image of the CLIP-family reward scorers and print a Markdown table.

Usage:
    python scripts/bench_rewards.py                  # tiny random models (seconds)
    python scripts/bench_rewards.py --real-size      # random weights with the real architectures
                                                     # (ViT-H-14 and ViT-L-14; needs about 10 GB RAM)

No checkpoint is downloaded: weights are random, which does not change the cost of a forward pass.
Each scorer gets ``--batch-size`` images of 256 x 256 pixels (resized to the model's input size), with
one prompt per group of ``--group-size`` images as in a GRPO step. The time includes preprocessing,
tokenisation and both towers. The FLOP column is the analytic count of one image-tower forward pass.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cogrpo_lightning.rewards import AestheticReward, CLIPScoreReward, HPSv2Reward, PickScoreReward
from cogrpo_lightning.rewards.aesthetic import AestheticMLP

TINY = {
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "image_size": 32, "patch_size": 8},
    "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    "projection_dim": 16,
    "hidden_act": "gelu",
}
# OpenCLIP ViT-H-14 (HPS v2, PickScore) and OpenAI ViT-L/14 (CLIPScore default, aesthetic predictor)
VIT_H_14 = {
    "vision": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
               "image_size": 224, "patch_size": 14},
    "text": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
             "vocab_size": 49408},
    "projection_dim": 1024,
    "hidden_act": "gelu",
}
VIT_L_14 = {
    "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
               "image_size": 224, "patch_size": 14},
    "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
             "vocab_size": 49408},
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}


def byte_level_tokenizer(directory: Path):
    """Save a CLIP tokenizer with the 512 byte-level tokens only (no merges) and return it."""
    from transformers import CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable + [256 + index for index in range(256 - len(printable))]
    characters = [chr(code) for code in codes]
    vocab = {token: index for index, token in enumerate(characters + [c + "</w>" for c in characters])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.save_pretrained(directory)
    return tokenizer


def save_random_clip(directory: Path, architecture: dict, tokenizer) -> int:
    """Save a random CLIPModel of ``architecture`` with the tokenizer; return its parameter count."""
    from transformers import CLIPConfig, CLIPModel

    activation = {"hidden_act": architecture["hidden_act"]}
    # the real models have CLIP's 49,408-token vocabulary; the byte-level test tokenizer uses its first 514 ids
    text = {"vocab_size": len(tokenizer), **architecture["text"], **activation, "max_position_embeddings": 77,
            "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    config = CLIPConfig(text_config=text, vision_config={**architecture["vision"], **activation},
                        projection_dim=architecture["projection_dim"])
    model = CLIPModel(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(parameter.numel() for parameter in model.parameters())


def image_tower_flops(vision: dict) -> float:
    """Multiply-adds x 2 of one ViT forward pass: patch embedding, attention and MLP of every layer."""
    width, mlp, layers = vision["hidden_size"], vision["intermediate_size"], vision["num_hidden_layers"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    tokens = patches + 1
    patch_embedding = 2 * patches * 3 * vision["patch_size"] ** 2 * width
    per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width
    return patch_embedding + layers * per_layer


def time_scorer(scorer, batch_size: int, group_size: int, repeats: int) -> float:
    """Median seconds per image over ``repeats`` scoring calls, after one warm-up call."""
    images = torch.rand(batch_size, 3, 256, 256)
    words = ["a red cat on a blue mat", "two dogs in the snow", "a photo of a lighthouse at night"]
    prompts = [f"{words[(index // group_size) % len(words)]} {index // group_size}" for index in range(batch_size)]
    scorer(images, prompts)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        scorer(images, prompts)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) / batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-size", action="store_true", help="use the real architectures instead of tiny ones")
    parser.add_argument("--batch-size", type=int, default=8, help="images per scoring call")
    parser.add_argument("--group-size", type=int, default=4, help="images that share one prompt")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per scorer (median is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    large, small = (VIT_H_14, VIT_L_14) if args.real_size else (TINY, TINY)
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        tokenizer = byte_level_tokenizer(root / "tokenizer")
        large_params = save_random_clip(root / "large", large, tokenizer)
        small_params = save_random_clip(root / "small", small, tokenizer)
        torch.save(AestheticMLP(small["projection_dim"]).state_dict(), root / "head.pth")
        builders = [
            ("HPSv2Reward", large, large_params, lambda: HPSv2Reward(checkpoint=str(root / "large"), tokenizer=str(root / "large"))),
            ("PickScoreReward", large, large_params, lambda: PickScoreReward(model=str(root / "large"), tokenizer=str(root / "large"))),
            ("CLIPScoreReward", small, small_params, lambda: CLIPScoreReward(model=str(root / "small"))),
            ("AestheticReward", small, small_params, lambda: AestheticReward(clip_model=str(root / "small"), head=str(root / "head.pth"))),
        ]
        for name, architecture, num_parameters, build in builders:
            scorer = build()
            per_image = time_scorer(scorer, args.batch_size, args.group_size, args.repeats)
            rows.append((name, num_parameters, image_tower_flops(architecture["vision"]), per_image))
            del scorer

    size = "real-size architectures, random weights" if args.real_size else "tiny random models"
    print(f"{size}; torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"batch {args.batch_size} images of 256x256, {args.group_size} images per prompt, median of {args.repeats}")
    print()
    print("| scorer | parameters | image-tower GFLOP per image | ms per image |")
    print("| --- | ---: | ---: | ---: |")
    for name, num_parameters, flops, per_image in rows:
        print(f"| {name} | {num_parameters / 1e6:,.2f} M | {flops / 1e9:,.3f} | {per_image * 1e3:,.2f} |")


if __name__ == "__main__":
    main()
