"""fastrlhf: RLHF (SFT, Bradley-Terry reward model, PPO) with fused Triton kernels and a hybrid engine."""

__version__ = "0.1.0"
