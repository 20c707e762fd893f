"""GenEval reward for the shapes world: the exact detector followed by GenEval's rules."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from cogrpo_lightning.benchmarks.geneval.rules import check_clauses
from cogrpo_lightning.benchmarks.shapes.detector import detect_objects
from cogrpo_lightning.benchmarks.shapes.world import COLOR_NAMES, SHAPES
from cogrpo_lightning.rewards.base import RewardModel

logger = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("correct", "partial")


def _shapes_world_problem(metadata: Mapping[str, Any]) -> str | None:
    """Return why a valid GenEval record cannot be satisfied in the shapes world, or None."""
    for key in ("include", "exclude"):
        for index, clause in enumerate(metadata.get(key, [])):
            if clause["class"] not in SHAPES:
                return f"{key}[{index}].class {clause['class']!r} is not one of {', '.join(SHAPES)}"
            color = clause.get("color")
            if color is not None and color not in COLOR_NAMES:
                return f"{key}[{index}].color {color!r} is not one of {', '.join(COLOR_NAMES)}"
    return None


class ShapesGenEvalReward(RewardModel):
    """GenEval score of shapes-world images from their metadata records.

    ``mode="correct"`` returns GenEval's correctness (1.0 or 0.0). ``mode="partial"`` returns the
    fraction of include and exclude clauses satisfied, a denser reward that is 1.0 exactly when the
    image is correct. A sample whose metadata is missing, invalid or names a class or colour outside
    the shapes world scores NaN. The first such batch logs a warning with the indices and the reason,
    and later ones log at DEBUG level and add to ``num_unscorable``.
    """

    name = "shapes_geneval"

    def __init__(self, mode: str = "correct") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(
                f"unknown mode {mode!r} for ShapesGenEvalReward; expected one of {', '.join(MODES)}"
            )
        self.mode = mode
        self.num_unscorable = 0
        self._warned = False

    def score(self, images: Tensor, prompts: list[str], metadata: list[Mapping[str, Any]]) -> Tensor:
        detections = detect_objects(images)
        scores = torch.full((len(prompts),), float("nan"))
        unscorable: dict[int, str] = {}
        for index, record in enumerate(metadata):
            if not record:
                unscorable[index] = "metadata is missing"
                continue
            try:
                passed, _ = check_clauses(detections[index], record)
            except ValueError as error:
                unscorable[index] = str(error)
                continue
            problem = _shapes_world_problem(record)
            if problem is not None:
                unscorable[index] = problem
                continue
            scores[index] = float(all(passed)) if self.mode == "correct" else sum(passed) / len(passed)
        if unscorable:
            self._report_unscorable(unscorable)
        return scores

    def _report_unscorable(self, unscorable: dict[int, str]) -> None:
        self.num_unscorable += len(unscorable)
        first_index, first_reason = next(iter(unscorable.items()))
        message = (
            f"{self.name}: scored NaN for samples {sorted(unscorable)} because their GenEval metadata is "
            f"unusable (sample {first_index}: {first_reason}); pass one record per prompt from a shapes prompt file"
        )
        if self._warned:
            logger.debug(message)
            return
        logger.warning(message + "; later unscorable samples are logged at DEBUG level")
        self._warned = True

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"
