"""fastrlhf.algo: RL math on top of fastrlhf.kernels.

Tensors and scalars in, tensors out; no config objects.
"""
from .advantages import (adv_estimator_names, compute_advantages, discounted_returns, get_adv_estimator,
                         grpo_advantages, needs_critic, register_adv_est, reinforce_pp_advantages,
                         reinforce_pp_baseline_advantages, rloo_advantages)
from .dpo import DPO_LOSSES, dpo_loss
from .kl_control import AdaptiveKLController, FixedKLController, StepKLController
from .normalize import NORMALIZE_MODES, RunningMoments, normalize_rewards
from .policy_loss import (get_policy_loss, gspo_loss, gspo_old_logprobs, gspo_policy_loss, policy_loss_names,
                          ppo_loss, register_policy_loss, sequence_log_ratio)
from .preference import bradley_terry_loss, calibration_bins, expected_calibration_error
from .reward_fns import RewardFunctions, WeightedRewardModels, filter_groups, load_reward_function
from .rewards import last_valid_index, token_rewards

__all__ = [
    "bradley_terry_loss", "expected_calibration_error", "calibration_bins",
    "token_rewards", "last_valid_index",
    "FixedKLController", "AdaptiveKLController", "StepKLController",
    "RunningMoments", "normalize_rewards", "NORMALIZE_MODES",
    # advantage estimators (registry by name)
    "register_adv_est", "get_adv_estimator", "adv_estimator_names", "needs_critic", "compute_advantages",
    "grpo_advantages", "rloo_advantages", "reinforce_pp_advantages", "reinforce_pp_baseline_advantages",
    "discounted_returns",
    # policy-loss variants (registry by name)
    "register_policy_loss", "get_policy_loss", "policy_loss_names", "ppo_loss", "gspo_loss",
    "gspo_policy_loss", "gspo_old_logprobs", "sequence_log_ratio",
    # offline preference losses
    "dpo_loss", "DPO_LOSSES",
    # rewards that are not a reward model
    "load_reward_function", "RewardFunctions", "WeightedRewardModels", "filter_groups",
]
