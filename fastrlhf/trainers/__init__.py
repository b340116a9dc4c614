"""fastrlhf.trainers: SFT, reward model and PPO trainers with their frozen dataclass configs.

Names resolve on first use, so ``import fastrlhf.trainers`` stays light and submodules can import
``fastrlhf.trainers.common`` without a cycle.
"""
import importlib

_EXPORTS = {
    "SFTTrainer": "sft", "SFTConfig": "sft",
    "RewardTrainer": "reward", "RewardConfig": "reward",
    "PPOTrainer": "ppo", "PPOConfig": "ppo",
    "DPOTrainer": "dpo", "DPOConfig": "dpo",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"fastrlhf.trainers.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'fastrlhf.trainers' has no attribute {name!r}")
