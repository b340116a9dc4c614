"""The memory plan: which model state is on the accelerator in which PPO phase.

Computed once at start from the device's free memory and the models' sizes, per rank (FSDP2 shards
every model over ``world_size`` ranks; the vLLM engine holds a full copy per tensor-parallel group).
Bytes per parameter, per rank (Rajbhandari et al. 2020, "ZeRO", section 3, mixed-precision Adam):

    trained model (actor, critic):  params p + grads p + Adam moments 2 * 4 bytes   -> sharded / world_size
    frozen model (reference, RM):    params p                                        -> sharded / world_size
    vLLM:                            weights in the engine dtype / tp + KV-cache budget

with ``p`` the bytes of the parameter dtype (4 for fp32 masters). HF rollout of an FSDP2 actor (no vLLM):
GENERATE all-gathers the whole actor once and keeps it unsharded until the end of generation
(``rollout.hf.gathered``), so GENERATE also holds ``actor.gathered``: the full actor in the compute dtype
(2 bytes under bf16), on top of the shards; it exists in no other phase. A phase needs its working set plus an
activation reserve; what else still fits stays resident, the rest is offloaded to CPU, in a fixed order of
preference (cheapest to move back last). On a CPU device there is nothing to offload to: all resident.
"""
from __future__ import annotations

from dataclasses import dataclass, field

PHASES = ("generate", "score", "train", "sync")

# Items the plan places: model parameters and (for trained models) grads + optimizer state.
# Working sets: what each phase touches and must therefore be resident.
_WORKING = {
    "generate": ("vllm.weights", "vllm.kv"),
    "score": ("actor.params", "critic.params", "ref.params", "reward.params"),
    "train": ("actor.params", "actor.optim", "critic.params", "critic.optim"),
    "sync": ("actor.params", "vllm.weights"),
}
# vLLM state the scheduler releases in each phase (sleep level 1 in SCORE/TRAIN; only weights woken for SYNC).
_ASLEEP = {"score": ("vllm.weights", "vllm.kv"), "train": ("vllm.weights", "vllm.kv"), "sync": ("vllm.kv",)}
# Order in which idle items are kept resident while they fit (first = kept first): parameters that
# the next phase needs are worth keeping; optimizer state is the largest and moved last-needed.
_KEEP_ORDER = ("actor.params", "critic.params", "ref.params", "reward.params", "vllm.weights",
               "actor.optim", "critic.optim", "vllm.kv")


class MemoryPlanError(RuntimeError):
    """A phase's working set does not fit the device even with everything else offloaded."""


@dataclass(frozen=True)
class ModelSize:
    """``numel`` parameters of ``param_bytes`` bytes each; ``trained`` adds grads + Adam state for the
    ``trainable`` of them (None: all; fewer with LoRA, where the base weights are frozen)."""

    numel: int
    param_bytes: int = 4
    trained: bool = False
    optim_bytes_per_param: int = 8  # Adam exp_avg + exp_avg_sq in fp32
    trainable: int | None = None


def model_size(model, *, trained: bool) -> ModelSize:
    """Parameter count and bytes/param of ``model`` (full, unsharded: DTensor shapes are global)."""
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    pbytes = params[0].element_size() if params else 4
    trainable = sum(p.numel() for p in params if p.requires_grad) if trained else None
    return ModelSize(numel=numel, param_bytes=pbytes, trained=trained,
                     trainable=None if trainable == numel else trainable)


@dataclass
class MemoryPlan:
    """``placement[phase][item]``: "resident", "offloaded", or "sequential" (onloaded only around its own
    forward); ``bytes[item]`` per rank."""

    device: str
    budget_bytes: int | None
    bytes: dict[str, int]
    placement: dict[str, dict[str, str]]
    notes: list[str] = field(default_factory=list)
    precision: str = "fp32"
    gradient_checkpointing: bool = False

    def where(self, phase: str, item: str) -> str:
        return self.placement.get(phase, {}).get(item, "resident")

    def numerics(self) -> str:
        """One line: what the byte counts assume (compute dtype, masters, optimizer state, activations)."""
        if self.precision == "bf16":
            num = ("precision bf16: bf16 compute, fp32 masters + fp32 grads + fp32 AdamW (16 B/param trained), "
                   "frozen models bf16 (2 B/param)")
        else:
            num = "precision fp32: fp32 compute and masters, fp32 grads + AdamW (16 B/param trained)"
        act = ("activations checkpointed (each layer keeps its input, recomputed in backward)"
               if self.gradient_checkpointing else "activations stored for backward (no checkpointing)")
        return f"{num}; {act}"

    def as_dict(self) -> dict:
        return {"device": self.device, "budget_mb": _mb(self.budget_bytes), "precision": self.precision,
                "gradient_checkpointing": self.gradient_checkpointing,
                "bytes_mb": {k: _mb(v) for k, v in self.bytes.items()},
                "placement": self.placement, "notes": list(self.notes)}

    def flat_metrics(self) -> dict[str, float]:
        """Numbers for ``metrics.jsonl``: ``plan/<phase>/<item>`` = 1 on device (resident or sequential)
        or 0 offloaded; ``plan/<item>_mb`` sizes per rank; ``plan/budget_mb`` (-1: no accelerator)."""
        out: dict[str, float] = {"plan/budget_mb": float(_mb(self.budget_bytes) or -1.0)}
        out.update({f"plan/{k}_mb": float(_mb(v)) for k, v in self.bytes.items()})
        for phase, items in self.placement.items():
            out.update({f"plan/{phase}/{k}": float(v != "offloaded") for k, v in items.items()})
        return out

    def format(self) -> str:
        """A table: one row per item, one column per phase (R resident, - offloaded, S sequential)."""
        budget = "host memory (no offload)" if self.budget_bytes is None else f"{_mb(self.budget_bytes)} MB"
        lines = [f"memory plan on {self.device}: budget {budget}", "  " + self.numerics(),
                 f"  {'item':<14}{'MB/rank':>10}  " + "  ".join(f"{p:>8}" for p in PHASES)]
        for item, nbytes in self.bytes.items():
            cells = "  ".join(f"{_CELL[self.placement[p][item]]:>8}" for p in PHASES)
            lines.append(f"  {item:<14}{_mb(nbytes):>10.1f}  {cells}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


_CELL = {"resident": "R", "offloaded": "-", "sequential": "S"}


def _mb(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 2)


def item_bytes(sizes: dict[str, ModelSize | None], *, world_size: int = 1, tp: int = 1,
               vllm_param_bytes: int = 2, vllm_kv_bytes: int = 0, has_vllm: bool = False) -> dict[str, int]:
    """Bytes per rank of every plan item (see the module docstring for the arithmetic)."""
    out: dict[str, int] = {}
    for name, size in sizes.items():
        if size is None:
            continue
        out[f"{name}.params"] = -(-size.numel * size.param_bytes // world_size)
        if size.trained:
            per_param = size.param_bytes + size.optim_bytes_per_param  # grads in param dtype + Adam
            trainable = size.numel if size.trainable is None else size.trainable
            out[f"{name}.optim"] = -(-trainable * per_param // world_size)
    if has_vllm and sizes.get("actor") is not None:
        out["vllm.weights"] = -(-sizes["actor"].numel * vllm_param_bytes // tp)
        out["vllm.kv"] = int(vllm_kv_bytes)
    return out


def plan_memory(sizes: dict[str, ModelSize | None], *, budget_bytes: int | None, device: str = "cpu",
                world_size: int = 1, tp: int = 1, vllm_param_bytes: int = 2, vllm_kv_bytes: int = 0,
                has_vllm: bool = False, activation_reserve: float = 0.1, precision: str = "fp32",
                gradient_checkpointing: bool = False, offload: str = "auto",
                vllm_sleeps: bool = True, fsdp: bool = False) -> MemoryPlan:
    """Place every item for every phase.

    ``sizes``: {"actor", "critic", "ref", "reward"} -> ModelSize or None (absent model).
    ``budget_bytes``: free accelerator memory per rank (None: CPU, everything resident).
    ``activation_reserve``: fraction of the budget kept free for activations and transient buffers.
    Raises MemoryPlanError naming the phase when a working set alone exceeds the budget.
    ``offload`` (the config key) overrides the plan's choice: "none" keeps all training state resident,
    "optimizer" / "all" offload the AdamW state outside TRAIN; "params" / "all" also note that the trained
    shards live on the host (FSDP2 ``CPUOffloadPolicy``, applied when the models are sharded).
    ``fsdp``: the models are FSDP2-sharded; with the HF rollout (no vLLM) GENERATE then also holds the
    gathered full actor (``actor.gathered``, in the compute dtype of ``precision``).
    """
    nbytes = item_bytes(sizes, world_size=world_size, tp=tp, vllm_param_bytes=vllm_param_bytes,
                        vllm_kv_bytes=vllm_kv_bytes, has_vllm=has_vllm)
    if fsdp and not has_vllm and sizes.get("actor") is not None:
        actor = sizes["actor"]
        nbytes["actor.gathered"] = actor.numel * (2 if precision == "bf16" else actor.param_bytes)
    if budget_bytes is None:
        placement = {p: {k: "resident" for k in nbytes} for p in PHASES}
        _gathered_only_in_generate(placement)
        return MemoryPlan(device, None, nbytes, placement, ["no accelerator: all state stays in host memory"],
                          precision, gradient_checkpointing)
    usable = int(budget_bytes * (1.0 - activation_reserve))
    placement, notes = {}, []
    for phase in PHASES:
        working = [k for k in _WORKING[phase] if k in nbytes]
        if not vllm_sleeps:  # rollout.sleep_level=0: the engine keeps weights and KV cache in every phase
            working += [k for k in ("vllm.weights", "vllm.kv") if k in nbytes and k not in working]
        if not has_vllm and phase in ("generate", "sync"):
            # HF rollout: the actor itself generates; no engine copy to sync.
            working = ["actor.params"] + (["actor.gathered"] if "actor.gathered" in nbytes else []) \
                if phase == "generate" else []
        used = sum(nbytes[k] for k in working)
        sequential: list[str] = []
        if used > usable and phase == "score":
            # Critic, reference and RM can be onloaded one after another (around their own forward).
            sequential = [k for k in ("critic.params", "ref.params", "reward.params") if k in nbytes]
            used = _sequential_score_bytes(nbytes)
            notes.append("score: critic/ref/reward onloaded one at a time (they do not fit together)")
        if used > usable:
            how = " (critic/ref/reward onloaded one at a time)" if sequential else ""
            raise MemoryPlanError(
                f"phase {phase!r} needs {_mb(used)} MB per rank for {working}{how} but only {_mb(usable)} MB "
                f"are usable ({_mb(budget_bytes)} MB free, {activation_reserve:.0%} reserved); use more "
                f"ranks (FSDP shards by world_size={world_size}), a smaller model, or bf16 parameters")
        phase_plan = {k: "sequential" if k in sequential else "resident" for k in working}
        for item in _ASLEEP.get(phase, ()) if vllm_sleeps else ():
            if item in nbytes:
                phase_plan[item] = "offloaded"
        for item in _KEEP_ORDER:
            if item in nbytes and item not in phase_plan:
                fits = used + nbytes[item] <= usable
                phase_plan[item] = "resident" if fits else "offloaded"
                used += nbytes[item] if fits else 0
        phase_plan.setdefault("actor.gathered", "offloaded")  # transient: GENERATE only
        placement[phase] = {k: phase_plan[k] for k in nbytes}
    _gathered_only_in_generate(placement)
    if "actor.gathered" in nbytes:
        notes.append("generate: the HF rollout all-gathers the whole actor (actor.gathered), freed after it")
    _force_offload(placement, notes, offload)
    return MemoryPlan(device, budget_bytes, nbytes, placement, notes, precision, gradient_checkpointing)


def _gathered_only_in_generate(placement: dict[str, dict[str, str]]) -> None:
    for phase, items in placement.items():
        if "actor.gathered" in items and phase != "generate":
            items["actor.gathered"] = "offloaded"  # not held: "-" in the table


def _force_offload(placement: dict[str, dict[str, str]], notes: list[str], offload: str) -> None:
    if offload == "auto":
        return
    for phase, items in placement.items():
        for item in items:
            if item == "actor.gathered":
                continue
            if offload == "none" and item.split(".")[0] in ("actor", "critic", "ref", "reward"):
                items[item] = "resident"
            elif offload in ("optimizer", "all") and item.endswith(".optim") and phase != "train":
                items[item] = "offloaded"
    if offload in ("params", "all"):
        notes.append("offload=params: actor/critic shards, grads and the AdamW step on the host (CPUOffloadPolicy)")
    notes.append(f"offload={offload} set by the config (not chosen by the plan)")


def _sequential_score_bytes(nbytes: dict[str, int]) -> int:
    """SCORE with frozen models onloaded one at a time: the actor plus the largest other model."""
    others = [nbytes[k] for k in ("critic.params", "ref.params", "reward.params") if k in nbytes]
    return nbytes.get("actor.params", 0) + max(others, default=0)
