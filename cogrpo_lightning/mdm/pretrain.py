"""BERT-style masked-token pretraining of the tiny MDM on the shapes world.

Every batch is made on the fly: a random GenEval-grammar prompt of any tag, a random scene that
satisfies it, and that scene's exact token grid. The objective is MaskGIT's: mask a cosine-scheduled
fraction of the tokens and predict them, with the loss on masked positions only. A fraction of the
prompts is replaced by the empty prompt so that classifier-free guidance works at sampling time.

Run it with ``python -m cogrpo_lightning fit --config configs/shapes/pretrain.yaml``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from cogrpo_lightning.benchmarks.shapes import world
from cogrpo_lightning.mdm.masking import cosine_mask_ratio, mask_tokens, masked_token_loss
from cogrpo_lightning.mdm.tiny import TinyMDM, TinyMDMConfig

_NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
_RELATIONS = ("left of", "right of", "above", "below")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def random_record(rng: random.Random) -> dict[str, Any]:
    """Draw a GenEval-grammar record of any tag and any composition, train and held-out alike.

    Pretraining draws from every composition, because the train/held-out split only separates
    the prompts of the RL stage. Unlike the benchmark's colour-attribute prompts, both objects may share a colour.
    """
    tag = rng.choice(("single_object", "two_object", "counting", "colors", "position", "color_attr"))
    a, b = rng.sample(world.SHAPES, 2)
    ca, cb = rng.choice(world.COLOR_NAMES), rng.choice(world.COLOR_NAMES)
    if tag == "single_object":
        return {"tag": tag, "include": [{"class": a, "count": 1}], "prompt": f"a photo of a {a}"}
    if tag == "two_object":
        return {"tag": tag, "include": [{"class": a, "count": 1}, {"class": b, "count": 1}], "prompt": f"a photo of a {a} and a {b}"}
    if tag == "counting":
        n = rng.choice((2, 3, 4))
        return {"tag": tag, "include": [{"class": a, "count": n}], "exclude": [{"class": a, "count": n + 1}], "prompt": f"a photo of {_NUMBER_WORDS[n]} {world.PLURALS[a]}"}
    if tag == "colors":
        return {"tag": tag, "include": [{"class": a, "count": 1, "color": ca}], "prompt": f"a photo of {_article(ca)} {ca} {a}"}
    if tag == "position":
        rel = rng.choice(_RELATIONS)
        return {"tag": tag, "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}], "prompt": f"a photo of a {a} {rel} a {b}"}
    return {"tag": tag, "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}], "prompt": f"a photo of {_article(ca)} {ca} {a} and {_article(cb)} {cb} {b}"}


class ShapesSceneStream(IterableDataset):
    """Endless stream of batches ``{"prompts": list[str], "token_ids": [B, L]}`` from random scenes."""

    def __init__(self, batch_size: int, seed: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        rng = random.Random(self.seed * 1000 + worker)
        while True:
            prompts, grids = [], []
            for _ in range(self.batch_size):
                record = random_record(rng)
                prompts.append(record["prompt"])
                grids.append(world.scene_tokens(world.sample_scene(record, rng)))
            yield {"prompts": prompts, "token_ids": torch.stack(grids)}


class ShapesPretrainDataModule(pl.LightningDataModule):
    """Random shapes-world scenes with their prompts for masked-token pretraining.

    Args:
        batch_size: scenes per optimizer step.
        num_workers: dataloader worker processes that render scenes.
        seed: seed of the scene stream (each worker offsets it).
    """

    def __init__(self, batch_size: int = 128, num_workers: int = 1, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        stream = ShapesSceneStream(self.batch_size, self.seed)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)


class MaskedTokenPretraining(pl.LightningModule):
    """Pretrain :class:`TinyMDM` with the masked-token objective.

    Args:
        hidden_size: transformer width D.
        num_layers: transformer layers of the image backbone.
        num_heads: attention heads.
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before cosine decay to 10% of the peak.
        condition_dropout: fraction of prompts replaced by the empty prompt (enables CFG).
        save_dir: where the final weights are written with ``TinyMDM.save_pretrained`` when fit ends
            (None writes nothing).
    """

    def __init__(
        self,
        hidden_size: int = 96,
        num_layers: int = 4,
        num_heads: int = 4,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 200,
        condition_dropout: float = 0.1,
        save_dir: str | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= condition_dropout < 1.0:
            raise ValueError(f"model.condition_dropout must be in [0, 1), got {condition_dropout}")
        self.save_hyperparameters()
        self.model = TinyMDM(TinyMDMConfig(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        prompts: list[str] = batch["prompts"]
        token_ids: Tensor = batch["token_ids"]  # [B, L]

        # drop prompts so that the empty prompt learns the unconditional distribution
        drop = torch.rand(len(prompts)) < self.hparams["condition_dropout"]
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]

        # mask a cosine-scheduled fraction of each row, at least one token
        ratio = cosine_mask_ratio(torch.rand(len(prompts), device=token_ids.device))
        ratio = ratio.clamp_min(1.0 / token_ids.shape[1])
        masked_ids, mask = mask_tokens(token_ids, ratio, self.model.mask_token_id)

        log_probs = self.model(masked_ids, self.model.encode_prompts(prompts))  # [B, L, V]
        loss = masked_token_loss(log_probs, token_ids, mask)

        with torch.no_grad():
            correct = (log_probs.argmax(-1) == token_ids) & mask
            accuracy = correct.sum() / mask.sum().clamp_min(1)
        self.log("pretrain/loss", loss, prog_bar=True)
        self.log("pretrain/masked_accuracy", accuracy, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams["learning_rate"], weight_decay=self.hparams["weight_decay"]
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.hparams["warmup_steps"], total)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_end(self) -> None:
        save_dir = self.hparams["save_dir"]
        if save_dir and self.trainer.is_global_zero:
            self.model.save_pretrained(Path(save_dir))
            rank_zero_info(f"saved the pretrained tiny MDM to {save_dir}")
