"""PromptDataModule: batches of B prompts with their metadata, for GRPO training and held-out validation.

The data side deals in prompts only. The LightningModule expands each prompt to G samples, so every
group of G samples lives on the device that drew its prompt and a group never spans devices. Under
DDP each rank draws distinct prompts through a ``DistributedSampler`` that this module builds itself,
so the ``seed`` option also applies with several devices and Lightning leaves the sampler alone.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cogrpo_lightning.data.readers import PROMPT_FILE_FORMATS, PromptFileFormat, PromptRecord, read_prompts


class PromptBatch(TypedDict):
    """One batch of B prompts: ``prompts`` [B] str, ``metadata`` [B] dict, ``index`` [B] dataset positions."""

    prompts: list[str]
    metadata: list[dict[str, Any]]
    index: Tensor


class PromptDataset(Dataset[tuple[int, PromptRecord]]):
    """Map-style dataset of prompt records. Item ``i`` is ``(i, record)`` with a copy of the metadata."""

    def __init__(self, records: Sequence[PromptRecord]) -> None:
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[int, PromptRecord]:
        record = self.records[index]
        # A deep copy, so code that edits a batch's metadata cannot change the prompt set for later epochs.
        return index, PromptRecord(prompt=record.prompt, metadata=copy.deepcopy(record.metadata))


def collate_prompts(items: Sequence[tuple[int, PromptRecord]]) -> PromptBatch:
    """Collate ``(index, record)`` items into a :class:`PromptBatch`. Prompts and metadata stay lists."""
    return {
        "prompts": [record.prompt for _, record in items],
        "metadata": [record.metadata for _, record in items],
        "index": torch.tensor([index for index, _ in items], dtype=torch.long),
    }


def check_batch_layout(
    num_train_prompts: int,
    prompts_per_batch: int,
    group_size: int,
    world_size: int,
    max_train_prompts: int | None = None,
) -> str:
    """Check that every device gets a full batch of prompts and return the per-step arithmetic as one message.

    Raises ValueError naming ``data.prompts_per_batch`` (and ``trainer.devices`` when world_size > 1)
    if the training set has fewer than ``world_size * prompts_per_batch`` prompts.
    """
    prompts_per_step = world_size * prompts_per_batch
    devices = "1 device" if world_size == 1 else f"{world_size} devices"
    if num_train_prompts < prompts_per_step:
        limit = ""
        if max_train_prompts is not None:
            limit = f" (limited by data.max_train_prompts={max_train_prompts})"
        options = "data.prompts_per_batch or trainer.devices" if world_size > 1 else "data.prompts_per_batch"
        raise ValueError(
            f"the training set has {num_train_prompts} prompts{limit}, but {devices} x {prompts_per_batch} "
            f"prompts per batch need at least {prompts_per_step} for one step; lower {options}, "
            "or add prompts to data.train_file"
        )

    samples_per_device = prompts_per_batch * group_size
    # Each rank gets floor(num_train_prompts / world_size) prompts and runs only full batches of them.
    steps_per_epoch = (num_train_prompts // world_size) // prompts_per_batch
    unused_prompts = num_train_prompts - steps_per_epoch * prompts_per_step
    return (
        f"{devices} x {prompts_per_batch} prompts per batch x group size {group_size} = "
        f"{world_size * samples_per_device} samples per step ({samples_per_device} per device); "
        f"groups never span devices. {num_train_prompts} training prompts give {steps_per_epoch} steps per "
        f"epoch, and {unused_prompts} prompts sit out each epoch because only full batches run."
    )


class PromptDataModule(LightningDataModule):
    """Prompt batches for Co-GRPO: B training prompts per device per step, held-out prompts for validation.

    Prompt files are read and checked when the module is built, so a bad file fails before any model
    work starts. ``setup`` checks the batch layout against the trainer's world size and prints it once
    on rank 0.

    Args:
        train_file: Training prompts: a .txt (one prompt per line), .jsonl (a "prompt" key per
            line, GenEval metadata included), .csv (a "prompt" column) or a DPG-Bench folder of
            <item_id>.txt files. Default: the built-in shapes training prompts.
        val_file: Held-out prompts for validation, in any format that train_file accepts, read
            in file order. Default: the built-in shapes held-out prompts.
        file_format: Format of both paths: txt, jsonl, geneval (jsonl whose lines must also have
            tag and include), csv or dpg (a folder). Default: detected from each path.
        prompts_per_batch: Prompts per training batch on each device (B). One step on one device
            generates B x group_size samples, so memory and time grow linearly with it.
        group_size: Samples generated per prompt (G), linked to the model's group size so it is
            set once. GRPO compares samples within a group, so it must be at least 2. Cost grows
            linearly with it.
        val_prompts_per_batch: Prompts per validation batch on each device. Default: prompts_per_batch.
        num_workers: DataLoader worker processes per device. 0 reads in the main process, which
            is enough for prompt text.
        shuffle: Reshuffle the training prompts every epoch. Validation prompts are never shuffled.
        seed: Seed of the training shuffle. The order of epoch e depends on seed + e and is the
            same on every rank, so ranks draw disjoint prompts.
        max_train_prompts: Use only the first this many training prompts (file order, before
            shuffling). Default: all.
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        file_format: PromptFileFormat | None = None,
        prompts_per_batch: int = 8,
        group_size: int = 8,
        val_prompts_per_batch: int | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        max_train_prompts: int | None = None,
    ) -> None:
        super().__init__()
        problems: list[str] = []
        _check_int(problems, "data.prompts_per_batch", prompts_per_batch, 1)
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2:
            problems.append(
                f"data.group_size={group_size!r} is invalid: GRPO needs at least 2 samples per prompt to "
                "compute group-relative advantages; set data.group_size to 2 or more"
            )
        if val_prompts_per_batch is not None:
            _check_int(problems, "data.val_prompts_per_batch", val_prompts_per_batch, 1)
        _check_int(problems, "data.num_workers", num_workers, 0)
        if max_train_prompts is not None:
            _check_int(problems, "data.max_train_prompts", max_train_prompts, 1)
        if file_format is not None and file_format not in PROMPT_FILE_FORMATS:
            problems.append(
                f"data.file_format={file_format!r} is invalid; use one of {', '.join(PROMPT_FILE_FORMATS)} "
                "or leave it unset to detect the format from each path"
            )
            file_format = None

        train_records = _load_records(problems, "data.train_file", train_file, "train", file_format)
        val_records = _load_records(problems, "data.val_file", val_file, "heldout", file_format)
        if train_records is not None and max_train_prompts is not None:
            train_records = train_records[:max_train_prompts]
        if train_records is not None and isinstance(prompts_per_batch, int) and prompts_per_batch >= 1:
            # The world size is unknown until a trainer is attached; one device is the least it can be.
            try:
                check_batch_layout(len(train_records), prompts_per_batch, group_size, 1, max_train_prompts)
            except ValueError as error:
                problems.append(str(error))
        if problems:
            raise ValueError("invalid PromptDataModule options:\n  - " + "\n  - ".join(problems))

        self.save_hyperparameters()
        self.prompts_per_batch = prompts_per_batch
        self.group_size = group_size
        self.val_prompts_per_batch = val_prompts_per_batch or prompts_per_batch
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.seed = seed
        self.max_train_prompts = max_train_prompts
        assert train_records is not None and val_records is not None
        self.train_dataset = PromptDataset(train_records)
        self.val_dataset = PromptDataset(val_records)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            world_size, _ = self._world()
            layout = check_batch_layout(
                len(self.train_dataset),
                self.prompts_per_batch,
                self.group_size,
                world_size,
                self.max_train_prompts,
            )
            rank_zero_info(layout)

    def train_dataloader(self) -> DataLoader[tuple[int, PromptRecord]]:
        """Loop over the training prompts in full batches of B per device, reshuffled every epoch.

        ``drop_last`` is on in the sampler and the loader. Each rank gets floor(number of prompts /
        world_size) prompts and only full batches run, so every step has B x G samples per device
        and no prompt repeats within an epoch. Up to world_size x B - 1 prompts sit out each epoch,
        different ones every epoch when shuffling.
        """
        world_size, rank = self._world()
        sampler = DistributedSampler(
            self.train_dataset,
            num_replicas=world_size,
            rank=rank,
            shuffle=self.shuffle,
            seed=self.seed,
            drop_last=True,
        )
        return self._loader(self.train_dataset, self.prompts_per_batch, sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader[tuple[int, PromptRecord]]:
        """Yield the held-out prompts in file order, split across ranks, with a last partial batch.

        With several devices the sampler pads the set by repeating up to world_size - 1 prompts so
        that every rank runs the same number of batches. Use ``batch["index"]`` to drop repeats.
        """
        world_size, rank = self._world()
        sampler = DistributedSampler(
            self.val_dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False
        )
        return self._loader(self.val_dataset, self.val_prompts_per_batch, sampler, drop_last=False)

    def _loader(
        self, dataset: PromptDataset, batch_size: int, sampler: DistributedSampler, drop_last: bool
    ) -> DataLoader[tuple[int, PromptRecord]]:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            collate_fn=collate_prompts,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _world(self) -> tuple[int, int]:
        """Return (world size, global rank) of the attached trainer, or (1, 0) without one."""
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank


def _check_int(problems: list[str], option: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        problems.append(f"{option}={value!r} is invalid; use an integer >= {minimum}")


def _load_records(
    problems: list[str],
    option: str,
    path: str | None,
    builtin_split: str,
    file_format: PromptFileFormat | None,
) -> list[PromptRecord] | None:
    """Read one prompt file for an option, or record why it cannot be read in ``problems``."""
    if path is None:
        try:
            path = str(_builtin_prompt_file(builtin_split))
        except (ImportError, AttributeError, OSError, ValueError) as error:
            problems.append(
                f"{option} is not set and the built-in shapes prompts are unavailable ({error}); "
                "pass a prompt file path"
            )
            return None
    try:
        return read_prompts(path, file_format)
    except FileNotFoundError as error:
        problems.append(
            f"{option}: {error}; pass an existing .txt, .jsonl or .csv file or a DPG-Bench folder"
        )
    except ValueError as error:
        problems.append(f"{option}: {error}")
    return None


def _builtin_prompt_file(split: str) -> Path:
    # Imported here because the shapes benchmark is optional for users who bring their own prompts.
    from cogrpo_lightning.benchmarks.shapes.prompts import default_prompt_file

    return Path(default_prompt_file(split))
