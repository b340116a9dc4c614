"""Tiny causal LMs built from configs (no downloads) for tests, the demo and CPU smoke runs.

Defaults give head_dim = hidden_size / num_heads = 32: vLLM rejects head sizes below 32 (ENV.md).
Weights are initialised under a private RNG seeded with ``seed``, so the global torch RNG is untouched
and the same arguments always give the same model.
"""
from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def _check_heads(hidden_size: int, num_heads: int) -> None:
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    if hidden_size // num_heads < 32:
        raise ValueError(f"head dim {hidden_size // num_heads} < 32 (hidden_size={hidden_size}, "
                         f"num_heads={num_heads}); vLLM rejects head sizes below 32")


def _build(model_cls, config, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.float().eval()


def tiny_llama(vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2,
               intermediate_size: int = 128, max_position_embeddings: int = 256,
               tie_word_embeddings: bool = False, seed: int = 0, pad_token_id: int | None = None,
               bos_token_id: int | None = None, eos_token_id: int | None = None,
               **kw) -> LlamaForCausalLM:
    """A randomly initialised fp32 ``LlamaForCausalLM`` (RoPE, RMSNorm, SwiGLU; Qwen2/Mistral-like).

    Extra keyword arguments go to ``LlamaConfig`` (e.g. ``num_key_value_heads``, ``rope_parameters``).
    """
    _check_heads(hidden_size, num_heads)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=kw.pop("num_key_value_heads",
                                                                                   num_heads),
                         intermediate_size=intermediate_size,
                         max_position_embeddings=max_position_embeddings,
                         tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id,
                         bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kw)
    return _build(LlamaForCausalLM, config, seed)


def tiny_gpt2(vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2,
              intermediate_size: int = 128, max_position_embeddings: int = 256,
              tie_word_embeddings: bool = True, seed: int = 0, pad_token_id: int | None = None,
              bos_token_id: int | None = None, eos_token_id: int | None = None,
              dropout: float = 0.0, **kw) -> GPT2LMHeadModel:
    """A randomly initialised fp32 ``GPT2LMHeadModel`` (absolute learned position embeddings).

    Dropout defaults to 0 so that train-mode and eval-mode forwards agree in tests.
    """
    _check_heads(hidden_size, num_heads)
    config = GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
                        n_inner=intermediate_size, n_positions=max_position_embeddings,
                        tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id,
                        bos_token_id=bos_token_id, eos_token_id=eos_token_id, resid_pdrop=dropout,
                        embd_pdrop=dropout, attn_pdrop=dropout, **kw)
    return _build(GPT2LMHeadModel, config, seed)
