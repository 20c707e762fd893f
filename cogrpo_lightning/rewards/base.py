"""The reward contract: images in [0, 1] and prompts in, one score per image out."""

from __future__ import annotations

import logging
import weakref
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn


def check_images(images: Tensor) -> None:
    """Raise ValueError unless images is a float tensor [N, 3, H, W] with values in [0, 1]."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [N, 3, H, W], got {list(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(
            f"images must be float in [0, 1], got dtype {images.dtype}; "
            "convert uint8 images with cogrpo_lightning.rewards.to_unit_range(images, '0-255')"
        )
    if images.numel() == 0:
        return
    low, high = float(images.min()), float(images.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"images must be in [0, 1], found values in [{low:.4g}, {high:.4g}]; "
            "convert with cogrpo_lightning.rewards.to_unit_range(images, '-1-1') or '0-255'"
        )


def to_unit_range(images: Tensor, source_range: str) -> Tensor:
    """Convert images from ``'-1-1'`` (float in [-1, 1]) or ``'0-255'`` (uint8 or float) to float [0, 1]."""
    if source_range == "-1-1":
        return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    if source_range == "0-255":
        return (images.float() / 255.0).clamp(0.0, 1.0)
    raise ValueError(f"source_range must be '-1-1' or '0-255', got {source_range!r}")


class RewardModel(nn.Module, ABC):
    """Base class of every scorer: ``reward(images, prompts, metadata) -> Tensor[N]``.

    ``images`` is float [N, 3, H, W] in [0, 1]; ``prompts`` has N strings; ``metadata`` has N
    mappings (benchmark records, may be empty). The result is float32 [N] on the images' device,
    NaN where a sample could not be scored. Subclasses implement :meth:`score`.
    """

    name: str = "reward"

    def forward(
        self,
        images: Tensor,
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> Tensor:
        check_images(images)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image")
        if metadata is None:
            metadata = [{} for _ in prompts]
        elif len(metadata) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(metadata)} metadata records")
        scores = self.score(images, list(prompts), list(metadata))
        return scores.to(device=images.device, dtype=torch.float32)

    @abstractmethod
    def score(self, images: Tensor, prompts: list[str], metadata: list[Mapping[str, Any]]) -> Tensor:
        """Score validated images; return [N] with NaN for unscorable samples."""


_logger = logging.getLogger(__name__)
# Scorers that have already logged a truncation. The set is weak, so a deleted scorer leaves it.
_scorers_with_truncation_logged: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def log_truncation_once(scorer: nn.Module, token_counts: Sequence[int], max_tokens: int) -> None:
    """Warn the first time ``scorer`` truncates a prompt to its text encoder's ``max_tokens`` limit.

    ``token_counts`` are the untruncated token counts (special tokens included) of one batch of
    prompts. The warning names the scorer, the limit and the longest prompt, and is logged at most
    once per scorer instance so that a long run does not repeat it every step.
    """
    too_long = [count for count in token_counts if count > max_tokens]
    if not too_long or scorer in _scorers_with_truncation_logged:
        return
    _scorers_with_truncation_logged.add(scorer)
    _logger.warning(
        "%s: %d of %d prompts are longer than the text encoder limit of %d tokens (longest: %d tokens) "
        "and were truncated to %d tokens; later truncations by this scorer are not logged",
        type(scorer).__name__,
        len(too_long),
        len(token_counts),
        max_tokens,
        max(too_long),
        max_tokens,
    )
