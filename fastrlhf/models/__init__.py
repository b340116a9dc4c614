"""fastrlhf.models: loading HF causal LMs, tiny test models, reward and value heads."""
from fastrlhf.models.loading import load_causal_lm, load_tokenizer, resolve_dtype
from fastrlhf.models.tiny import tiny_gpt2, tiny_llama

__all__ = ["load_causal_lm", "load_tokenizer", "resolve_dtype", "tiny_gpt2", "tiny_llama"]
