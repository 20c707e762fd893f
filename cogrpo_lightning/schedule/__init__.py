"""Inference schedules: the four knobs, the predefined schedule and the learned schedule policy."""

from cogrpo_lightning.schedule.knobs import KNOB_NAMES
from cogrpo_lightning.schedule.policy import SchedulePolicy
from cogrpo_lightning.schedule.predefined import PredefinedSchedule

__all__ = ["KNOB_NAMES", "PredefinedSchedule", "SchedulePolicy"]
