"""fastrlhf.rollout: generation backends behind one interface (HF generate, vLLM)."""
from .base import Generation, RolloutEngine, SamplingParams

__all__ = ["Generation", "RolloutEngine", "SamplingParams"]
