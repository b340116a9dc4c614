"""fastrlhf.algo: RL math on top of fastrlhf.kernels.

Tensors and scalars in, tensors out; no config objects.
"""
from .kl_control import AdaptiveKLController, FixedKLController, StepKLController
from .normalize import NORMALIZE_MODES, RunningMoments, normalize_rewards
from .preference import bradley_terry_loss, calibration_bins, expected_calibration_error
from .rewards import last_valid_index, token_rewards

__all__ = [
    "bradley_terry_loss", "expected_calibration_error", "calibration_bins",
    "token_rewards", "last_valid_index",
    "FixedKLController", "AdaptiveKLController", "StepKLController",
    "RunningMoments", "normalize_rewards", "NORMALIZE_MODES",
]
