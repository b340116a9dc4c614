"""LoRA adapters through PEFT (optional dependency): wrap, disable for the reference, merge for sync and export.

LoRA (Hu et al. 2021): a frozen weight ``W [out, in]`` gets a trainable low-rank update,
``y = x W^T + (alpha / r) * dropout(x) A^T B^T`` with ``A [r, in]`` (random init) and ``B [out, r]`` (zero
init), so a freshly wrapped model computes exactly what the base model does. Adapters are injected in place
(``peft.inject_adapter_in_model``): the model keeps its class and its forward, so ``PolicyWithLoss``,
``RewardModel`` and ``ValueModel`` work unchanged, FSDP2 wraps the same blocks, and only targeted linears
change names (``q_proj.weight`` -> ``q_proj.base_layer.weight`` + ``q_proj.lora_A.default.weight`` ...).

- ``apply_lora``: freeze everything, inject adapters, keep listed modules (scalar heads) fully trainable.
- ``adapters_disabled``: the base model's forward; with it the PPO reference is the actor itself (no
  fourth model): ``with adapters_disabled(actor): ref_lp = actor(..., mode="logprobs")``.
- ``merged_state_dict`` / ``merged_named_tensors``: ``W + (alpha / r) B A`` under the base model's own
  parameter names, for vLLM weight sync (one call per layer group) and the final export.
- ``adapter_state_dict``: only the trainable tensors, for checkpoints.

``peft`` is imported only when a function here is called.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

ADAPTER = "default"


def _peft():
    try:
        import peft
    except ImportError as err:
        raise ImportError("LoRA (lora_rank > 0) needs the 'peft' package: pip install peft") from err
    return peft


def apply_lora(model: nn.Module, *, rank: int, alpha: float | None = None, dropout: float = 0.0,
               target_modules: Sequence[str] | str | None = None,
               trainable_modules: Sequence[str] = ("head", "value_head")) -> nn.Module:
    """Inject LoRA adapters of ``rank`` into ``model`` in place and freeze everything else.

    ``alpha``: scaling numerator (default ``2 * rank``); ``target_modules``: linear names (default: every
    linear of the transformer blocks, PEFT's "all-linear" minus the LM head). Modules whose name ends with
    one of ``trainable_modules`` (the reward / value heads) stay fully trainable. Returns ``model``.
    """
    if rank < 1:
        raise ValueError(f"lora_rank must be >= 1 to apply LoRA, got {rank}")
    from torch.distributed.tensor import DTensor
    if any(isinstance(p, DTensor) for p in model.parameters()):  # FSDP2 units are fixed at fully_shard
        raise ValueError(f"{type(model).__name__} is already FSDP2-sharded: inject LoRA adapters before "
                         "sharding (pass an unsharded model, or let the trainer load it)")
    peft = _peft()
    targets = list(target_modules) if target_modules and not isinstance(target_modules, str) else target_modules
    if targets is None:
        targets = _default_targets(model)
    conv1d = any(type(m).__name__ == "Conv1D" for m in model.modules())  # GPT-2 stores weights [in, out]
    config = peft.LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
                             target_modules=targets, bias="none", fan_in_fan_out=conv1d)
    model.requires_grad_(False)
    try:
        peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as err:  # PEFT: "Target modules ... not found in the base model"
        raise ValueError(f"lora_target_modules={targets!r}: {err}") from None
    for name, module in model.named_modules():
        if name.split(".")[-1] in trainable_modules:
            module.requires_grad_(True)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    return model


def _default_targets(model: nn.Module) -> list[str]:
    """Names (last component) of the ``nn.Linear`` modules inside the transformer blocks; GPT-2's
    ``Conv1D`` projections too. The LM head and scalar heads are never adapted."""
    from fastrlhf.engine.fsdp import decoder_layers

    names: set[str] = set()
    for layer in decoder_layers(model):
        for name, m in layer.named_modules():
            if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":
                names.add(name.split(".")[-1])
    if not names:
        raise ValueError(f"cannot find linear layers to adapt in {type(model).__name__}; "
                         "set lora_target_modules")
    return sorted(names)


def lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside: ``model`` computes its base (pre-LoRA) function; adapters come back on exit."""
    layers = lora_layers(model)
    # PEFT's enable_adapters(False) also clears requires_grad of the adapters; keep every flag as it was
    # (under FSDP2 the trainable set is read at the first forward, which may be the reference's)
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    for p, flag in flags:
        p.requires_grad_(flag)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


def merged_named_tensors(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of ``module``'s parameters and persistent buffers under the base model's names,
    adapted weights merged: ``W + scaling * B @ A`` (``.base_layer`` dropped, ``lora_*`` left out).
    Detached; the model is not modified (no merge / unmerge round trip)."""
    lora_by_name = {name: m for name, m in module.named_modules() if _is_lora(m)}
    for name, tensor in module.state_dict().items():
        if ".lora_" in name or name.startswith("lora_"):
            continue
        owner = name.rsplit(".", 2)[0] if ".base_layer." in name else None
        clean = name.replace(".base_layer.", ".")
        value = tensor.detach()
        if owner is not None and name.endswith(".base_layer.weight") and owner in lora_by_name:
            layer = lora_by_name[owner]
            if ADAPTER in getattr(layer, "lora_A", {}):
                value = value + layer.get_delta_weight(ADAPTER).to(value.dtype)
        yield prefix + clean, value


def _is_lora(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "get_delta_weight")


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of the base architecture with adapters merged (see merged_named_tensors)."""
    return dict(merged_named_tensors(model))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the trainable tensors (adapters and fully trained heads), detached: what a LoRA checkpoint
    must save on top of the frozen base."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save_merged_pretrained(lm: nn.Module, directory, *, tokenizer=None) -> None:
    """Export an adapted HF causal LM as a plain checkpoint (``from_pretrained`` loads it, no peft)."""
    lm.save_pretrained(directory, state_dict=merged_state_dict(lm))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


__all__ = ["adapter_state_dict", "adapters_disabled", "apply_lora", "has_lora", "lora_layers",
           "merged_named_tensors", "merged_state_dict", "save_merged_pretrained"]
