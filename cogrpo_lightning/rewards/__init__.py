"""Reward models: one contract, several scorers, and a weighted combination."""

from cogrpo_lightning.rewards.base import RewardModel, check_images, to_unit_range

__all__ = ["RewardModel", "check_images", "to_unit_range"]

# CLIP-family scorers and the weighted combination. Importing them is cheap: transformers is
# imported only when a scorer is constructed.
from cogrpo_lightning.rewards.aesthetic import AestheticReward  # noqa: E402
from cogrpo_lightning.rewards.base import log_truncation_once  # noqa: E402
from cogrpo_lightning.rewards.clip_score import CLIPScoreReward  # noqa: E402
from cogrpo_lightning.rewards.combination import WeightedReward, normalize_per_group  # noqa: E402
from cogrpo_lightning.rewards.hps import HPSv2Reward, convert_hps_checkpoint  # noqa: E402
from cogrpo_lightning.rewards.pickscore import PickScoreReward  # noqa: E402

__all__ += [
    "AestheticReward",
    "CLIPScoreReward",
    "HPSv2Reward",
    "PickScoreReward",
    "WeightedReward",
    "convert_hps_checkpoint",
    "log_truncation_once",
    "normalize_per_group",
]

# ImageReward v1.0 scorer on transformers BLIP modules. Importing it is cheap: transformers is
# imported only when a scorer is constructed.
from cogrpo_lightning.rewards.image_reward import ImageRewardScorer  # noqa: E402

__all__ += ["ImageRewardScorer"]
