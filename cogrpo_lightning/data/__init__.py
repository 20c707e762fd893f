"""Prompt files and the PromptDataModule that batches them for Co-GRPO training and validation."""

from cogrpo_lightning.data.datamodule import (
    PromptBatch,
    PromptDataModule,
    PromptDataset,
    check_batch_layout,
    collate_prompts,
)
from cogrpo_lightning.data.readers import (
    PROMPT_FILE_FORMATS,
    PromptFileError,
    PromptFileFormat,
    PromptRecord,
    detect_format,
    read_csv_prompts,
    read_dpg_prompts,
    read_geneval_metadata,
    read_jsonl_prompts,
    read_prompts,
    read_txt_prompts,
    safe_filename,
)

__all__ = [
    "PROMPT_FILE_FORMATS",
    "PromptBatch",
    "PromptDataModule",
    "PromptDataset",
    "PromptFileError",
    "PromptFileFormat",
    "PromptRecord",
    "check_batch_layout",
    "collate_prompts",
    "detect_format",
    "read_csv_prompts",
    "read_dpg_prompts",
    "read_geneval_metadata",
    "read_jsonl_prompts",
    "read_prompts",
    "read_txt_prompts",
    "safe_filename",
]
