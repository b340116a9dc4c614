"""fastrlhf.models: loading HF causal LMs, tiny test models, reward and value heads."""
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
from fastrlhf.models.tiny import tiny_gpt2, tiny_llama

__all__ = [
    "MultiHeadRewardModel", "RewardEnsemble", "RewardModel", "ScalarHeadModel", "ValueModel", "body_of",
    "last_token_index", "load_causal_lm", "load_head_model", "load_tokenizer", "position_ids_from_mask",
    "resolve_dtype", "tiny_gpt2", "tiny_llama",
]
