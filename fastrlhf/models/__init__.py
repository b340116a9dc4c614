"""fastrlhf.models: loading HF causal LMs, tiny test models, reward and value heads, the PPO policy
wrapper that computes the fused loss inside its own forward (PolicyWithLoss)."""
from fastrlhf.models.heads import (
    RewardModel,
    ScalarHeadModel,
    ValueModel,
    body_of,
    last_token_index,
    load_head_model,
    position_ids_from_mask,
)
from fastrlhf.models.loading import load_causal_lm, load_tokenizer, resolve_dtype
from fastrlhf.models.multihead import MultiHeadRewardModel, RewardEnsemble
from fastrlhf.models.policy import PolicyWithLoss
from fastrlhf.models.tiny import tiny_gpt2, tiny_llama

__all__ = [
    "MultiHeadRewardModel", "PolicyWithLoss", "RewardEnsemble", "RewardModel", "ScalarHeadModel", "ValueModel", "body_of",
    "last_token_index", "load_causal_lm", "load_head_model", "load_tokenizer", "position_ids_from_mask",
    "resolve_dtype", "tiny_gpt2", "tiny_llama",
]
