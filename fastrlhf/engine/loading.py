"""Loading that scales: rank 0 reads the weights, every other rank builds the model on the meta device.

    source = ModelSource(build=lambda: PolicyWithLoss(AutoModelForCausalLM.from_config(cfg)),
                         load=lambda: PolicyWithLoss(load_causal_lm(path)))
    actor = materialize(runtime, source, train=True, precision="bf16")

Every rank builds the module on ``torch.device("meta")`` (no memory), shards it with FSDP2 there, then
allocates only its own shards on the training device (``to_empty``); rank 0 alone reads the checkpoint
into host memory and ``set_model_state_dict(..., full_state_dict=True, broadcast_from_rank0=True)`` sends
each rank its shards. No rank but 0 ever holds a full copy, no model goes to the GPU whole, and a caller
that materializes the four PPO models one after another holds at most one full copy (rank 0's) at a time.
Non-persistent buffers (rotary ``inv_freq``), which no state dict carries, are broadcast from rank 0.
In one process without a process group the model is simply loaded (and moved to the device).
"""
from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class ModelSource:
    """How to make one model: ``build()`` the structure (random or no weights; called under the meta
    device) and ``load()`` it with its real weights on the host (called on rank 0 only)."""

    build: Callable[[], nn.Module]
    load: Callable[[], nn.Module]


def materialize(runtime, source: ModelSource, *, train: bool, precision: str = "fp32",
                fsdp: bool | None = None, offload_params: bool = False) -> nn.Module:
    """The model of ``source`` on ``runtime.device``: FSDP2-sharded when there is a process group (or
    ``fsdp=True``), a plain module otherwise. Frozen models (``train=False``) are stored in the compute
    dtype of ``precision`` with fp32 heads."""
    from .fsdp import shard_model
    from .precision import cast_frozen
    use_fsdp = (dist.is_available() and dist.is_initialized()) if fsdp is None else fsdp
    if not use_fsdp:
        model = source.load()
        if not train:
            model.requires_grad_(False).eval()
            cast_frozen(model, precision)
        return model.to(runtime.device)
    rank = dist.get_rank()
    full_state, buffers = None, {}
    if rank == 0:
        loaded = source.load()
        # bf16 frozen models (and LoRA's frozen base) travel, and sit on rank 0, in bf16
        cast_frozen(loaded, precision, frozen_only=train)
        full_state = loaded.state_dict()
        buffers = {k: b for k, b in loaded.named_buffers()}
        del loaded
    with torch.device("meta"):
        model = source.build()
    model = shard_model(model, device=runtime.device, train=train, precision=precision,
                        offload_params=offload_params, broadcast=False)
    target = torch.device("cpu") if offload_params else runtime.device
    model.to_empty(device=target)
    _load_full_state(model, full_state)
    _broadcast_buffers(model, buffers, rank)
    del full_state, buffers
    gc.collect()
    return model


def _load_full_state(model: nn.Module, full_state: dict | None) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    set_model_state_dict(model, full_state if full_state is not None else {}, options=options)


def _broadcast_buffers(model: nn.Module, rank0_buffers: dict[str, torch.Tensor], rank: int) -> None:
    """Buffers after ``to_empty`` hold garbage; rank 0's loaded values go to every rank."""
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if rank == 0:
                buf.copy_(rank0_buffers[name].to(buf.device, buf.dtype))
            dist.broadcast(buf, src=0)


def load_one_after_another(runtime, sources: dict[str, tuple[ModelSource | None, bool]], *,
                           precision: str = "fp32", offload_params: bool = False) -> dict[str, nn.Module | None]:
    """``{name: (source, train)}`` -> ``{name: model}``, materialized in order (rank 0 holds one full copy
    at a time)."""
    return {name: None if src is None else materialize(runtime, src, train=train, precision=precision,
                                                       offload_params=offload_params and train)
            for name, (src, train) in sources.items()}


# ------------------------------------------------------------------------------ sources for our models
def causal_lm_source(path: str, *, wrap: Callable[[nn.Module], nn.Module] | None = None,
                     dtype: torch.dtype = torch.float32) -> ModelSource:
    """An HF causal LM directory (or hub name), optionally wrapped (``PolicyWithLoss``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fastrlhf.models.loading import _check_local, load_causal_lm
    wrap = wrap or (lambda m: m)

    def build():
        config = AutoConfig.from_pretrained(_check_local(path))
        return wrap(AutoModelForCausalLM.from_config(config, dtype=dtype))

    return ModelSource(build=build, load=lambda: wrap(load_causal_lm(path, dtype=dtype)))


def head_model_source(path: str, cls, *, dtype: torch.dtype = torch.float32) -> ModelSource:
    """A fastrlhf ``RewardModel`` / ``ValueModel`` folder (``cls.from_pretrained``)."""
    import json
    from pathlib import Path

    from transformers import AutoConfig, AutoModel

    from fastrlhf.models.heads import HEAD_FILE

    def build():
        config = AutoConfig.from_pretrained(path)
        meta = json.loads((Path(path) / HEAD_FILE).read_text())
        body = AutoModel.from_config(config, dtype=dtype)
        kwargs = {"heads": meta["heads"]} if "heads" in meta and cls.__name__ == "MultiHeadRewardModel" else {}
        model = cls(body, **kwargs)
        for key in ("reward_mean", "reward_std"):  # head metadata the loaded model carries too
            if key in meta and hasattr(model, key):
                setattr(model, key, meta[key])
        return model

    return ModelSource(build=build, load=lambda: cls.from_pretrained(path, dtype=dtype))
