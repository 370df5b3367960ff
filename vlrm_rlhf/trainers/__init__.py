"""Trainers that use merged vision-language rewards: PPO for (vision-)language policies."""

from .ppo import VLPPOTrainer
from .ppo_config import VLPPOConfig

__all__ = ["VLPPOConfig", "VLPPOTrainer"]
