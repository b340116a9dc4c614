"""The seam between trainers and the engine: process group, device, model wrapping, rollout, weight sync.

Trainers (PPO, the demo) call only these functions, so a single process on CPU and an SPMD run under
``torchrun`` with FSDP2 and vLLM use the same trainer code. This default covers one process with the
HF rollout; the hybrid engine extends each function (FSDP2, vLLM, offload plan) behind the same names.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .scheduler import PhaseScheduler


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    scheduler: PhaseScheduler = field(default=None)  # type: ignore[assignment]

    def __post_init__(self):
        if self.scheduler is None:
            self.scheduler = PhaseScheduler(self.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of ``t`` over ranks (identity in one process)."""
        if self.world_size == 1:
            return t
        out = t.detach().clone()
        torch.distributed.all_reduce(out)
        return out / self.world_size

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def init_runtime(device: str | None = None) -> Runtime:
    """Device from ``device`` or CUDA when available; multi-process runs are the hybrid engine's job."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise NotImplementedError("multi-process runs (torchrun) need the hybrid engine (issue 6)")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Runtime(device=dev)


def prepare_models(runtime: Runtime, *, actor, critic, ref, reward_model):
    """Move / wrap the four PPO models for this runtime (FSDP2 under torchrun). Critic may be None."""
    moved = [m.to(runtime.device) if m is not None else None for m in (actor, critic, ref, reward_model)]
    for frozen in moved[2:]:
        if frozen is not None:
            frozen.requires_grad_(False).eval()
    return tuple(moved)


def make_rollout(runtime: Runtime, backend: str, actor, tokenizer, **kwargs):
    """The rollout engine for ``backend`` ("hf": generate with the actor itself, no weight sync needed)."""
    if backend == "hf":
        from fastrlhf.rollout.hf import HFRollout
        return HFRollout(actor, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    raise NotImplementedError(f"rollout backend {backend!r} needs the hybrid engine (issue 6)")


def sync_weights(runtime: Runtime, actor, rollout) -> None:
    """Push the actor's current weights into ``rollout`` when it holds its own copy (vLLM)."""
    if getattr(rollout, "shares_actor_weights", False):
        return
    rollout.update_weights(actor.state_dict().items())
