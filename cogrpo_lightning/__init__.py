"""Co-GRPO for masked diffusion models as PyTorch Lightning modules."""

from cogrpo_lightning.data import PromptDataModule
from cogrpo_lightning.mdm.base import Condition, MaskedDiffusionModel
from cogrpo_lightning.module import CoGRPOModule
from cogrpo_lightning.schedule import PredefinedSchedule, SchedulePolicy

__all__ = [
    "CoGRPOModule",
    "Condition",
    "MaskedDiffusionModel",
    "PredefinedSchedule",
    "PromptDataModule",
    "SchedulePolicy",
]
