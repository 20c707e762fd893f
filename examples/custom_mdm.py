"""Add a new masked diffusion model (MDM) to cogrpo_lightning and train it with Co-GRPO.

This example shows the whole path for a backend that the package does not ship:

1. ``PaletteMDM`` subclasses :class:`cogrpo_lightning.mdm.base.MaskedDiffusionModel`. It is a toy
   text-to-image model: a 4x4 grid of tokens, each one of 16 palette colours, predicted by a small
   transformer from a hashed bag-of-words prompt encoding, and decoded to a 32x32 RGB image.
2. ``RednessReward`` subclasses :class:`cogrpo_lightning.rewards.base.RewardModel` and scores how
   red an image is, and ``MostlyRed`` turns that into the 1/0 correctness that the held-out table
   reports.
3. ``CoGRPOModule(mdm=..., reward=..., eval_reward=...)`` runs two Co-GRPO training steps (one
   model update, one schedule update) on prompts written to a temporary txt file, and the held-out
   table compares the base model with the predefined schedule against the trained model with the
   learned schedule.

The weights are random, so the numbers mean nothing; the point is the code a new backend needs.
Run it from the repository root; it needs no network and took about 5 seconds on a 2-core CPU
machine, most of it imports::

    python examples/custom_mdm.py
"""

from __future__ import annotations

import colorsys
import tempfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cogrpo_lightning.data import PromptDataModule
from cogrpo_lightning.mdm.base import Condition, MaskedDiffusionModel
from cogrpo_lightning.module import CoGRPOModule
from cogrpo_lightning.rewards.base import RewardModel
from cogrpo_lightning.schedule.predefined import PredefinedSchedule


def palette_colors(size: int = 16) -> Tensor:
    """Return `size` RGB colours in [0, 1] as [size, 3]: 8 hues at full and at half brightness."""
    hues = size // 2
    colors = [colorsys.hsv_to_rgb(i / hues, 1.0, value) for value in (1.0, 0.5) for i in range(hues)]
    return torch.tensor(colors, dtype=torch.float32)


class PaletteMDM(MaskedDiffusionModel):
    """A toy MDM: 4x4 palette tokens, a hashed bag-of-words prompt encoder and a small transformer.

    Token ids 0..15 are palette colours and 16 is the mask token. Each prompt word is hashed with
    CRC-32 (stable across processes, unlike Python's ``hash``) into one of `num_buckets` rows of an
    embedding table. The transformer reads the prompt's word vectors and the 16 image tokens as
    one sequence and predicts every image position.
    """

    def __init__(
        self, hidden_size: int = 32, num_layers: int = 2, num_buckets: int = 256, max_words: int = 8
    ) -> None:
        super().__init__()
        self.codebook_size = 16
        self.mask_token_id = 16
        self.latent_shape = (4, 4)
        self.hidden_size = hidden_size
        self.num_buckets = num_buckets
        self.max_words = max_words

        # Bucket 0 is reserved for padding, so the empty (negative) prompt encodes to padding only.
        self.word_embedding = nn.Embedding(num_buckets, hidden_size, padding_idx=0)
        self.token_embedding = nn.Embedding(self.codebook_size + 1, hidden_size)  # + 1 for the mask token
        self.position = nn.Parameter(torch.randn(self.num_tokens, hidden_size) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                hidden_size, 2, 2 * hidden_size, 0.0, batch_first=True, norm_first=True
            )
            for _ in range(num_layers)
        )
        self.head = nn.Linear(hidden_size, self.codebook_size)
        self.register_buffer("palette", palette_colors(self.codebook_size), persistent=False)

    @property
    def condition_dim(self) -> int:
        return self.hidden_size

    def encode_prompts(self, prompts: Sequence[str]) -> Condition:
        ids = torch.zeros(len(prompts), self.max_words, dtype=torch.long)  # [N, K], 0 = padding
        for row, prompt in enumerate(prompts):
            words = prompt.lower().split()[: self.max_words]
            for column, word in enumerate(words):
                ids[row, column] = 1 + zlib.crc32(word.encode("utf-8")) % (self.num_buckets - 1)
        ids = ids.to(self.position.device)
        mask = ids != 0  # [N, K], True for a real word
        hidden = self.word_embedding(ids)  # [N, K, D]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # [N, D]
        return Condition(hidden, mask, pooled)

    def forward(self, token_ids: Tensor, condition: Condition) -> Tensor:
        image = self.token_embedding(token_ids) + self.position  # [N, L, D]
        sequence = torch.cat([condition.hidden, image], dim=1)  # [N, K + L, D]
        for block in self.blocks:
            sequence = block(sequence)
        logits = self.head(sequence[:, -self.num_tokens :])  # [N, L, V]
        # The contract: float32 log-probabilities over the V image codes only, never the mask token.
        return F.log_softmax(logits.float(), dim=-1)

    def decode(self, token_ids: Tensor) -> Tensor:
        """Paint each token as an 8x8 block of its palette colour: [N, L] -> [N, 3, 32, 32] in [0, 1]."""
        if bool((token_ids == self.mask_token_id).any()):
            raise ValueError("decode needs complete token grids, but some positions are still the mask token")
        height, width = self.latent_shape
        colors = self.palette[token_ids.long()]  # [N, L, 3]
        grid = colors.view(-1, height, width, 3).permute(0, 3, 1, 2)  # [N, 3, 4, 4]
        return F.interpolate(grid, scale_factor=8, mode="nearest")

    def default_schedule(self) -> PredefinedSchedule:
        """Return a linear re-mask ratio with CFG scale 2, which a zero schedule action reproduces."""
        return PredefinedSchedule(remask_ratio="linear", cfg_scale=2.0)

    def fsdp_units(self) -> list[nn.Module]:
        """Return the transformer blocks, which FSDP2 shards one by one under ModelParallelStrategy."""
        return list(self.blocks)


def redness(images: Tensor) -> Tensor:
    """Return the mean of R - (G + B) / 2 per image [N], in [-1, 1]."""
    red, green, blue = images.unbind(dim=1)
    return (red - (green + blue) / 2).mean(dim=(1, 2))


class RednessReward(RewardModel):
    """Training reward: the redness of each image, regardless of the prompt."""

    name = "redness"

    def score(self, images: Tensor, prompts: list[str], metadata: list[Mapping[str, Any]]) -> Tensor:
        return redness(images)


class MostlyRed(RewardModel):
    """Held-out correctness: 1 when the image is redder than `threshold`, else 0."""

    name = "mostly_red"

    def __init__(self, threshold: float = 0.05) -> None:
        super().__init__()
        self.threshold = threshold

    def score(self, images: Tensor, prompts: list[str], metadata: list[Mapping[str, Any]]) -> Tensor:
        return (redness(images) > self.threshold).float()


TRAIN_PROMPTS = ["a red sunset", "a crimson rose", "a cherry on a plate", "red paint on a wall"]
HELD_OUT_PROMPTS = ["a ruby ring", "a fire truck"]


def main() -> None:
    torch.set_num_threads(1)  # more threads only add overhead for a model this small
    pl.seed_everything(0, verbose=False)

    with tempfile.TemporaryDirectory() as folder:
        train_file = Path(folder) / "train.txt"
        val_file = Path(folder) / "heldout.txt"
        train_file.write_text("\n".join(TRAIN_PROMPTS) + "\n", encoding="utf-8")
        val_file.write_text("\n".join(HELD_OUT_PROMPTS) + "\n", encoding="utf-8")

        data = PromptDataModule(
            train_file=str(train_file), val_file=str(val_file), prompts_per_batch=2, group_size=4
        )
        module = CoGRPOModule(
            mdm=PaletteMDM(),
            reward=RednessReward(),
            eval_reward=MostlyRed(),
            group_size=4,
            num_steps=8,
            mode="alternating",
            model_lr=1e-3,
            eval_images_per_prompt=2,
        )
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=2,
            num_sanity_val_steps=-1,  # the sanity check measures the base model for the table
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=folder,
        )
        trainer.fit(module, data)

    table = module.evaluator.last_table
    assert table is not None, "validation did not run, so there is no held-out table"
    print("\nHeld-out table (fraction of images that are mostly red):")
    print(table.to_markdown())
    print("\nLearned schedule at T = 8 (per-step knob values):")
    for name, values in module.export_schedule().items():
        print(f"  {name:<21} " + " ".join(f"{value:6.3f}" for value in values))


if __name__ == "__main__":
    main()
