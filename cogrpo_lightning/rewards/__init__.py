"""Reward models: one contract, several scorers, and a weighted combination."""

from cogrpo_lightning.rewards.base import RewardModel, check_images, to_unit_range

__all__ = ["RewardModel", "check_images", "to_unit_range"]
