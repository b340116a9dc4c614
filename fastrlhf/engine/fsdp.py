"""FSDP2 wrapping, CPU offload / onload, and full-state-dict gathering for the four PPO models.

Each transformer block is its own FSDP2 unit (one all-gather per block in forward and backward, one
reduce-scatter per block in backward), the root unit holds what is left (embeddings, final norm, lm_head,
value / reward heads). The same units are the buckets of the vLLM weight sync (``weight_sync.py``).
PyTorch's FSDP2 reference: https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

# Methods of our model classes that run a forward outside ``forward``: FSDP2 must unshard around them.
_FORWARD_METHODS = ("hidden_states", "head_outputs", "last_token_outputs", "head_scores")


def hf_model_prefix(model: nn.Module) -> tuple[str, nn.Module]:
    """The outermost ``transformers.PreTrainedModel`` inside ``model`` and its name prefix ("" for itself).

    The PPO actor may be a wrapper (e.g. a module computing the fused loss) around the HF causal LM;
    weight sync and HF-format saving need the LM's own parameter names.
    """
    from transformers import PreTrainedModel
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            return (name + "." if name else ""), module
    raise TypeError(f"{type(model).__name__} contains no transformers.PreTrainedModel")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``: classes named in HF's ``_no_split_modules``, else the
    children of the largest ``nn.ModuleList``."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def broadcast_module(model: nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers equal to rank ``src``'s before sharding.

    Heads initialised from the global RNG (value head, reward head) would otherwise differ by rank,
    and FSDP2 would silently stitch the shards of different initialisations together.
    """
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=src)


def shard_model(model: nn.Module, *, device: torch.device, train: bool, bf16: bool | None = None,
                reshard_after_forward: bool = True, precision: str | None = None,
                offload_params: bool = False, broadcast: bool = True) -> nn.Module:
    """``fully_shard`` each transformer block, then the root, over the default process group.

    ``precision`` ("bf16" / "fp32"; default from ``bf16``, itself default: on CUDA only): a trained model
    under bf16 gets ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` -- fp32 master shards,
    bf16 compute, fp32 gradient reduction -- with its scalar heads kept in fp32; a frozen model is stored
    in bf16 itself (``precision.cast_frozen``), and so are the frozen parameters of a trained model (LoRA's
    base; adapters and heads keep fp32 masters). Frozen models (``train=False``) get
    ``requires_grad_(False)`` and eval mode. ``offload_params``: FSDP2 ``CPUOffloadPolicy`` (shards,
    grads and the optimizer step on the host). ``broadcast=False`` for a model built on the meta device
    (``engine.loading``): nothing to broadcast, nothing to move. Returns the same object, an ``FSDPModule``.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard, register_fsdp_forward_method

    from .precision import cast_frozen, fp32_head_policy, head_modules, mixed_precision_policy
    if precision is None:
        precision = "bf16" if (device.type == "cuda" if bf16 is None else bf16) else "fp32"
    if not train:
        model.requires_grad_(False).eval()
        cast_frozen(model, precision)
    else:  # LoRA: the frozen base is stored in the compute dtype, as a frozen model (no fp32 master)
        cast_frozen(model, precision, frozen_only=True)
    if broadcast:
        model.to(device)
        broadcast_module(model)
    kwargs = {"reshard_after_forward": reshard_after_forward}
    policy = mixed_precision_policy(precision, trained=train)
    if policy is not None:
        kwargs["mp_policy"] = policy
    if offload_params:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    if device.type == "cuda":
        from torch.distributed.device_mesh import init_device_mesh
        kwargs["mesh"] = init_device_mesh("cuda", (dist.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    if policy is not None:  # reward / value heads compute in fp32 (inputs cast up by their policy)
        for head in head_modules(model):
            fully_shard(head, **{**kwargs, "mp_policy": fp32_head_policy()})
    # The root keeps its parameters (embeddings, lm_head, heads) gathered after forward, as FSDP2 does
    # by default for a root's forward: backward needs them at once, and methods registered below may call
    # each other (``head_outputs`` -> ``hidden_states``) -- an inner call must not reshard the outer's.
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})
    for name in _FORWARD_METHODS:
        if callable(getattr(model, name, None)):
            register_fsdp_forward_method(model, name)
    if not train:
        # No backward will reshard a frozen root: free its gathered embeddings / heads after forward.
        model.register_forward_hook(lambda module, args, output: module.reshard())
    return model


# ------------------------------------------------------------------------------------ offload / onload
def move_model(model: nn.Module, device: torch.device | str) -> None:
    """Move a model's parameters and buffers (FSDP2: its local shards) to ``device``, in place.

    FSDP2 modules re-register their sharded parameters after ``nn.Module.to`` (``FSDPModule._apply``),
    so ``.to`` is correct for sharded and plain modules alike. Gradients move with their parameters.
    """
    device = torch.device(device)
    _reshard(model)  # FSDP2 keeps the root unit gathered after a forward: move shards only
    model.to(device)
    for p in model.parameters():
        if p.grad is not None and p.grad.device != device:
            p.grad = p.grad.to(device)


def _reshard(model: nn.Module) -> None:
    """Free every FSDP2 unit's unsharded parameters (the root stays gathered after a forward until its
    backward); a no-op for plain modules and units already sharded. Local: no communication."""
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def move_optimizer(optimizer: torch.optim.Optimizer, device: torch.device | str) -> None:
    """Move every tensor of the optimizer state (Adam moments, step) to ``device``, in place."""
    device = torch.device(device)
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.device != device:
                # Adam keeps "step" on CPU unless capturable; keep scalar steps where they are.
                if key == "step" and value.dim() == 0 and value.device.type == "cpu":
                    continue
                state[key] = value.to(device, non_blocking=True)


def offload_to_cpu(model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Offload parameters (and grads) and/or optimizer state to host memory; on CUDA the freed blocks go
    back to the driver (``empty_cache``) so that vLLM or the next model can use them."""
    if model is not None:
        move_model(model, "cpu")
    if optimizer is not None:
        move_optimizer(optimizer, "cpu")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def onload(model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None, *,
           device: torch.device | str) -> None:
    """Inverse of :func:`offload_to_cpu`."""
    if model is not None:
        move_model(model, device)
    if optimizer is not None:
        move_optimizer(optimizer, device)


# ------------------------------------------------------------------------------- full state dict, save
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU: complete on rank 0, empty on other ranks.

    A collective under FSDP2: every rank must call it. Plain modules: a CPU copy of ``state_dict()``.
    """
    if not is_fsdp(model):
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def save_hf_pretrained(model: nn.Module, directory: str | Path, *, tokenizer=None) -> bool:
    """Save the HF causal LM inside ``model`` (which may be FSDP2-sharded and/or wrapped) so that
    ``AutoModelForCausalLM.from_pretrained(directory)`` loads it. Collective: every rank calls it;
    rank 0 writes, one bucket of whole layers at a time (``checkpoint.export_hf``). Returns True on the
    writing rank.
    """
    from .checkpoint import export_hf
    return export_hf(model, directory, tokenizer=tokenizer)
