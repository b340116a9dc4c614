"""PPO helpers around the run folder: the critic's ``ValueModel`` export, dropping metrics rows a crashed run
logged after its last checkpoint, and the early-stop rule. The checkpoints themselves are sharded DCP
folders (``ppo_checkpoint.py``, ``engine.checkpoint``)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def save_critic(trainer, directory: str | Path) -> Path:
    """The separate critic as a ``ValueModel`` folder (``ValueModel.from_pretrained`` loads it: a later run's
    ``critic_model``), with the tokenizer: streamed from FSDP2 shards a bucket of whole layers at a time
    (``engine.checkpoint.export_head_model``), written by rank 0 into a temporary folder renamed at the end."""
    from fastrlhf.engine.checkpoint import export_head_model
    from fastrlhf.trainers.ppo_checkpoint import write_atomically

    write = lambda tmp: export_head_model(trainer.critic, tmp, tokenizer=trainer.tokenizer)  # noqa: E731
    return write_atomically(trainer.runtime, directory, write)  # LoRA: adapters merged (export_head_model)


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
