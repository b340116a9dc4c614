"""PPO checkpoints: everything a resumed run needs to end exactly where an uninterrupted one would.

Layout of ``output_dir/checkpoints/step-NNNNNNNN/`` (written atomically, ``trainer_state.pt`` last):

    actor/              the policy in HF format (``AutoModelForCausalLM.from_pretrained`` loads it)
    value_head.pt       the shared-critic value head (shared_critic only)
    critic.safetensors  the critic's full state dict (separate critic only)
    trainer_state.pt    optimizers, LR schedulers, KL controller, RunningMoments, early-stop state,
                        iteration (the data position follows from it), every RNG state

State dicts go through ``torch.distributed.checkpoint.state_dict`` with full (unsharded) tensors, so
the same code saves plain modules and FSDP2-sharded ones (collectives on every rank, files from rank 0).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from fastrlhf.trainers import common

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def save_ppo_checkpoint(trainer, step: int) -> Path:
    """Write the checkpoint for ``step`` completed iterations; returns its directory (rank 0's view)."""
    actor_state = get_model_state_dict(trainer.actor, options=_FULL)
    critic_state = get_model_state_dict(trainer.critic, options=_FULL) if trainer.critic is not None else None
    optim = {
        name: get_optimizer_state_dict(model, opt, options=_FULL)
        for name, (model, opt) in trainer.optimized().items()
    }
    final = common.checkpoint_dir(trainer.output_dir, step)
    if trainer.runtime.is_main:
        with common.atomic_save_dir(final) as tmp:
            lm = trainer.unwrapped_lm()
            lm.save_pretrained(tmp / "actor", state_dict=_strip(actor_state, "lm."))
            if trainer.tokenizer is not None:
                trainer.tokenizer.save_pretrained(tmp / "actor")
            head = _strip(actor_state, "value_head.")
            if head:
                torch.save(head, tmp / "value_head.pt")
            if critic_state is not None:
                save_file(
                    {k: v.contiguous() for k, v in critic_state.items()}, str(tmp / "critic.safetensors")
                )
            extra = {
                "optim": optim,
                "schedulers": {k: s.state_dict() for k, s in trainer.schedulers.items()},
                **trainer.bookkeeping_state(),
            }
            common.save_trainer_state(tmp, step=step, extra=extra)
        common.prune_checkpoints(trainer.output_dir, trainer.config.keep_checkpoints)
    trainer.runtime.barrier()
    return final


def save_policy(trainer, directory: str | Path) -> Path:
    """The actor alone, in HF format with the tokenizer (``AutoModelForCausalLM.from_pretrained``)."""
    actor_state = get_model_state_dict(trainer.actor, options=_FULL)
    directory = Path(directory)
    if trainer.runtime.is_main:
        with common.atomic_save_dir(directory) as tmp:
            trainer.unwrapped_lm().save_pretrained(tmp, state_dict=_strip(actor_state, "lm."))
            if trainer.tokenizer is not None:
                trainer.tokenizer.save_pretrained(tmp)
    trainer.runtime.barrier()
    return directory


def save_critic(trainer, directory: str | Path) -> Path:
    """The separate critic as a ``ValueModel`` folder (``ValueModel.from_pretrained`` loads it: a later run's
    ``critic_model``), with the tokenizer; full tensors gathered from FSDP2 shards, files from rank 0."""
    from fastrlhf.models.heads import HEAD_FILE, WEIGHTS_FILE

    state = get_model_state_dict(trainer.critic, options=_FULL)
    directory = Path(directory)
    if trainer.runtime.is_main:
        with common.atomic_save_dir(directory) as tmp:
            trainer.critic.config.save_pretrained(tmp)
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS_FILE),
                      metadata={"format": "pt"})
            meta = {"class": "ValueModel", "num_heads": int(trainer.critic.head.out_features)}
            (tmp / HEAD_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            if trainer.tokenizer is not None:
                trainer.tokenizer.save_pretrained(tmp)
    trainer.runtime.barrier()
    return directory


def load_ppo_checkpoint(trainer, directory: Path) -> int:
    """Restore ``trainer`` from ``directory``; returns the number of completed iterations."""
    from transformers import AutoModelForCausalLM

    lm_state = AutoModelForCausalLM.from_pretrained(directory / "actor", dtype=torch.float32).state_dict()
    actor_state = {f"lm.{k}": v for k, v in lm_state.items()}
    if (directory / "value_head.pt").is_file():
        head = torch.load(directory / "value_head.pt", map_location="cpu", weights_only=True)
        actor_state.update({f"value_head.{k}": v for k, v in head.items()})
    set_model_state_dict(
        trainer.actor, actor_state, options=StateDictOptions(full_state_dict=True, strict=True)
    )
    if trainer.critic is not None:
        critic_state = load_file(str(directory / "critic.safetensors"))
        set_model_state_dict(trainer.critic, critic_state, options=StateDictOptions(full_state_dict=True))
    state = common.load_trainer_state(directory, restore_rng=True)
    extra = state["extra"]
    for name, (model, opt) in trainer.optimized().items():
        set_optimizer_state_dict(
            model, opt, extra["optim"][name], options=StateDictOptions(full_state_dict=True)
        )
    for name, sched in trainer.schedulers.items():
        sched.load_state_dict(extra["schedulers"][name])
    trainer.load_bookkeeping_state(extra)
    return int(state["step"])


def drop_rows_after(path: Path, step: int) -> None:
    """Remove ppo rows logged after ``step`` (by a run that crashed before its next checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not (row.get("stage") == "ppo" and row.get("step", 0) > step):
            keep.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def early_stop_rule(es, kl_target: float, state: dict, m: dict) -> str | None:
    """Update the early-stop ``state`` with this iteration's metrics ``m``; the rule that fires, or None.

    ``es`` is an ``EarlyStopConfig``; ``state`` holds the SFT policy's response length (first
    iteration), the EMA of the RM score and how many iterations in a row it fell; it is checkpointed.
    """
    if state["base_length"] is None:
        state["base_length"] = m["response_length"]
    prev = state["score_ema"]
    ema = m["rm_score"] if prev is None else es.score_ema * prev + (1 - es.score_ema) * m["rm_score"]
    state["score_ema"] = ema
    state["falling"] = state["falling"] + 1 if prev is not None and ema < prev else 0
    if es.kl_factor is not None and m["kl"] > es.kl_factor * kl_target:
        return f"kl {m['kl']:.3f} > {es.kl_factor} x target {kl_target}"
    if es.length_factor is not None and m["response_length"] > es.length_factor * state["base_length"]:
        length, base = m["response_length"], state["base_length"]
        return f"response length {length:.2f} > {es.length_factor} x SFT {base:.2f}"
    if es.score_falling_iters is not None and state["falling"] >= es.score_falling_iters:
        return f"RM score EMA fell for {state['falling']} iterations"
    return None
