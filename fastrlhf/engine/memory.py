"""The memory plan the scheduler applies: which model state is on the accelerator in which PPO phase.

The byte counts and the choice of offload level come from the planner (``engine/planner.py``, the model
behind ``fastrlhf plan``): ``prepare_models`` / ``make_rollout`` build a :class:`~fastrlhf.engine.planner.PlanSpec`
from the models' HF configs, the runtime (ranks, precision, checkpointing, offload) and the trainer's token
budget, and ``planner.scheduler_plan`` turns ``plan_ppo``'s answer into this placement (item ->
resident / offloaded / sequential / host per phase). On a CPU device there is nothing to offload to: all resident.

Items: ``<model>.params`` (parameters, per rank), ``<model>.optim`` (fp32 grads + AdamW moments of the
trainable parameters), ``vllm.weights`` and ``vllm.kv`` (the engine's share: asleep outside GENERATE /
SYNC unless ``rollout.sleep_level`` is 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field

PHASES = ("generate", "score", "train", "sync")


class MemoryPlanError(RuntimeError):
    """The planner's verdict is "does not fit" on this device; the message is its whole table."""


@dataclass
class MemoryPlan:
    """``placement[phase][item]``: "resident", "offloaded", "sequential" (onloaded only for its own SCORE
    turn, ``PhaseScheduler.onloaded``) or "host" (offload=all: FSDP2's ``CPUOffloadPolicy`` keeps the
    trained shards on the host and moves them itself; the scheduler leaves them alone); ``bytes[item]``
    per rank."""

    device: str
    budget_bytes: int | None
    bytes: dict[str, int]
    placement: dict[str, dict[str, str]]
    notes: list[str] = field(default_factory=list)
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    offload: str = "none"  # the offload level the planner chose (or the config set)
    predicted: dict[str, int] = field(default_factory=dict)  # phase -> bytes per rank the planner expects
    predicted_items: dict[str, dict[str, int]] = field(default_factory=dict)  # phase -> the planner's items
    table: str = ""  # the planner's table (``planner.format_plan``)

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
                "gradient_checkpointing": self.gradient_checkpointing, "offload": self.offload,
                "predicted_mb": {k: _mb(v) for k, v in self.predicted.items()},
                "predicted_items_mb": {p: {k: _mb(v) for k, v in items.items()}
                                       for p, items in self.predicted_items.items()},
                "bytes_mb": {k: _mb(v) for k, v in self.bytes.items()},
                "placement": self.placement, "notes": list(self.notes)}

    def flat_metrics(self) -> dict[str, float]:
        """Numbers for ``metrics.jsonl``: ``plan/<phase>/<item>`` = 1 on device (resident or sequential)
        or 0 (offloaded, or on the host under CPUOffloadPolicy); ``plan/<item>_mb`` sizes per rank; ``plan/budget_mb`` (-1: no accelerator)."""
        out: dict[str, float] = {"plan/budget_mb": float(_mb(self.budget_bytes) or -1.0)}
        out.update({f"plan/{k}_mb": float(_mb(v)) for k, v in self.bytes.items()})
        out.update({f"plan/{p}_predicted_mb": float(_mb(v)) for p, v in self.predicted.items()})
        for phase, items in self.placement.items():
            out.update({f"plan/{phase}/{k}": float(v in ("resident", "sequential")) for k, v in items.items()})
        return out

    def format(self) -> str:
        """A table: one row per item, one column per phase (R resident, - offloaded, S sequential, H host)."""
        budget = "host memory (no offload)" if self.budget_bytes is None else f"{_mb(self.budget_bytes)} MB"
        lines = [f"memory plan on {self.device}: budget {budget}", "  " + self.numerics(),
                 f"  {'item':<14}{'MB/rank':>10}  " + "  ".join(f"{p:>8}" for p in PHASES)]
        for item, nbytes in self.bytes.items():
            cells = "  ".join(f"{_CELL[self.placement[p][item]]:>8}" for p in PHASES)
            lines.append(f"  {item:<14}{_mb(nbytes):>10.1f}  {cells}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines + ([self.table] if self.table else []))


_CELL = {"resident": "R", "offloaded": "-", "sequential": "S", "host": "H"}


def _mb(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 2)
