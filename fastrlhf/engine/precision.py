"""Precision, gradient checkpointing, dropout and the optimizer: the numerics every stage trains with.

``precision`` (one key for SFT, reward model and PPO):

    auto  bf16 on CUDA, fp32 on CPU
    bf16  bf16 compute, fp32 master weights, fp32 gradients for the optimizer and fp32 AdamW state.
          Under FSDP2: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` (parameters are
          all-gathered in bf16, gradients reduce-scattered in fp32 into fp32 shards). A plain module
          (one CPU process) keeps fp32 parameters and computes under ``torch.autocast(bf16)``.
          Frozen models (reference, reward model) are stored in bf16 (no fp32 copy); scalar heads
          (reward, value) stay fp32 in both cases.
    fp32  everything fp32.

Why fp32 masters: a bf16 weight has 8 bits of mantissa, so an AdamW update of ``lr = 1e-6`` on a weight
of 0.02 (relative change 5e-5 < 2^-8) rounds away entirely (Micikevicius et al. 2018, "Mixed Precision
Training", section 3.1; measured in ``tests/engine/test_precision.py``).
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

PRECISIONS = ("auto", "bf16", "fp32")
OFFLOADS = ("auto", "none", "optimizer", "params", "all")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"auto"`` -> "bf16" on CUDA, "fp32" elsewhere; "bf16" / "fp32" as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype forward passes run in for a resolved ``precision``."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def legacy_precision(name: str, precision: str, *, bf16: bool | None, dtype: str | None) -> str:
    """The ``precision`` a config means, taking the pre-0.2 keys ``bf16`` / ``dtype`` as aliases.

    ``bf16: true`` / ``dtype: bfloat16`` -> "bf16"; ``bf16: false`` / ``dtype: float32`` -> "fp32"; each with a
    ``DeprecationWarning`` naming ``precision``. Aliases that disagree with each other or with an explicit
    ``precision`` are an error naming the keys. Other dtypes (fp16) are refused: use ``precision``.
    """
    from fastrlhf.config import ConfigError
    implied: dict[str, str] = {}
    if bf16 is not None:
        implied["bf16"] = "bf16" if bf16 else "fp32"
    if dtype is not None:
        mapping = {"bfloat16": "bf16", "bf16": "bf16", "float32": "fp32", "fp32": "fp32"}
        if dtype not in mapping:
            raise ConfigError(f"{name}: dtype={dtype!r} is not supported; the key is replaced by "
                              f"precision: auto|bf16|fp32")
        implied["dtype"] = mapping[dtype]
    if not implied:
        return precision
    values = set(implied.values())
    if len(values) > 1 or (precision != "auto" and precision not in values):
        keys = ", ".join(f"{k} (-> {v})" for k, v in implied.items())
        raise ConfigError(f"{name}: precision={precision!r} conflicts with the deprecated key(s) {keys}; "
                          "set only precision")
    value = values.pop()
    warnings.warn(f"{name}: the keys {sorted(implied)} are deprecated aliases of precision "
                  f"(read as precision={value!r}); they will be removed in 0.3", DeprecationWarning,
                  stacklevel=3)
    return value


def autocast(precision: str, device: torch.device | str, *,
             fsdp: bool = False) -> contextlib.AbstractContextManager:
    """bf16 autocast for a plain module under ``precision="bf16"`` (CPU or CUDA); a no-op for fp32 and
    for FSDP2 modules, whose ``MixedPrecisionPolicy`` already casts the parameters."""
    if precision == "bf16" and not fsdp:
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def mixed_precision_policy(precision: str, *, trained: bool = True):
    """FSDP2 ``MixedPrecisionPolicy`` for trained modules under bf16 (None otherwise): bf16 all-gather and
    compute, fp32 gradient reduce-scatter into the fp32 master shards. Frozen models hold bf16 parameters
    themselves and need no policy."""
    if precision != "bf16" or not trained:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def fp32_head_policy():
    """A policy that keeps a scalar head (value / reward) in fp32 inside a bf16 model (inputs cast up)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The scalar heads of ``model`` that must compute in fp32: ``head`` of a ``ScalarHeadModel``,
    ``value_head`` of a shared-critic ``PolicyWithLoss``."""
    out = []
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last in ("head", "value_head") and isinstance(module, nn.Linear) and module.out_features <= 64:
            out.append(module)
    return out


def cast_frozen(model: nn.Module, precision: str, *, frozen_only: bool = False) -> nn.Module:
    """Store a frozen model in the compute dtype (bf16 under bf16: no fp32 copy); heads stay fp32.
    ``frozen_only``: only the parameters that do not require grad (LoRA's frozen base; adapters and heads
    keep their fp32 masters)."""
    dtype = compute_dtype(precision)
    heads = {id(p) for h in head_modules(model) for p in h.parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if frozen_only and p.requires_grad:
                continue
            if id(p) not in heads and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    return model


# ----------------------------------------------------------------------------- checkpointing, dropout
def zero_dropout(model: nn.Module) -> int:
    """Set every dropout probability in ``model`` to 0 (``nn.Dropout`` modules and the float
    ``attention_dropout`` / ``dropout`` attributes HF attention layers read in training mode), so the
    model can stay in ``train()`` mode -- which HF gradient checkpointing needs -- while computing the
    same function as in ``eval()``. Returns how many were non-zero."""
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            changed += module.p != 0
            module.p = 0.0
        for attr in ("attention_dropout", "dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop"):
            value = module.__dict__.get(attr)
            if isinstance(value, float) and value != 0.0:
                setattr(module, attr, 0.0)
                changed += 1
    for module in model.modules():  # configs too: code that rebuilds a layer reads them
        config = module.__dict__.get("config")
        for attr in ("attention_dropout", "hidden_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop",
                     "dropout", "activation_dropout"):
            if isinstance(getattr(config, attr, None), float):
                setattr(config, attr, 0.0)
    return changed


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """HF activation checkpointing (non-reentrant) on every outermost ``PreTrainedModel`` in ``model``:
    each decoder layer keeps only its input and runs its forward again in backward. Returns how many
    models were switched on. Effective only in ``train()`` mode (HF skips it in eval)."""
    from transformers import PreTrainedModel
    done, seen = 0, set()
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and not any(name.startswith(s) for s in seen):
            if not getattr(module, "supports_gradient_checkpointing", False):
                raise ValueError(f"{type(module).__name__} does not support gradient checkpointing")
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            seen.add(name + "." if name else "")
            done += 1
    if not done:
        raise ValueError(f"{type(model).__name__} contains no transformers model to checkpoint")
    return done


# ------------------------------------------------------------------------------------------ optimizer
def adamw(params_or_groups, *, lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
          weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW with its fused kernel when every parameter is a plain CPU/CUDA tensor of one device type,
    else the multi-tensor (foreach) implementation (FSDP2's DTensor shards). Both keep fp32 state for fp32
    master parameters. Measured on CPU at 10M parameters: see ``tests/engine/test_precision.py``."""
    from torch.distributed.tensor import DTensor
    groups = list(params_or_groups)
    flat = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    kinds = {p.device.type for p in flat}
    fused = (bool(flat) and not any(isinstance(p, DTensor) for p in flat) and len(kinds) == 1
             and kinds <= {"cpu", "cuda"} and all(p.is_floating_point() for p in flat))
    kw = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **kw)
