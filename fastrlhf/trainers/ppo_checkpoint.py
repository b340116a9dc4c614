"""PPO checkpoints in DCP's sharded format (``fastrlhf.engine.checkpoint``).

``output_dir/checkpoints/step-NNNNNNNN/`` holds one ``.distcp`` file per rank (that rank's shards of actor
and critic and of both AdamW states, fp32), DCP's ``.metadata``, ``rng-rank{r}.json`` per rank and
``trainer_state.json``: iteration, LR schedulers, KL controller, reward RunningMoments, counters and the
early-stop state. No rank gathers a full model, nothing is a pickle. A resumed run at the same world size
ends exactly where an uninterrupted one does; another world size is refused with a message.
"""
from __future__ import annotations

from pathlib import Path

from fastrlhf.engine import checkpoint as dcp_ckpt
from fastrlhf.trainers import common


def _models(trainer) -> dict:
    return {"actor": trainer.actor, **({"critic": trainer.critic} if trainer.critic is not None else {})}


def save_sharded(trainer, step: int) -> Path:
    """Checkpoint after ``step`` completed iterations (a collective: every rank calls it)."""
    state = {"step": int(step), "schedulers": {k: s.state_dict() for k, s in trainer.schedulers.items()},
             **trainer.bookkeeping_state()}
    final = dcp_ckpt.save_checkpoint(common.checkpoint_dir(trainer.output_dir, step), models=_models(trainer),
                                     optimizers=trainer.optimized(), state=state)
    dcp_ckpt.prune_checkpoints(Path(trainer.output_dir) / common.CHECKPOINTS, trainer.config.keep_checkpoints)
    trainer.runtime.barrier()
    return final


def latest(output_dir) -> Path | None:
    return dcp_ckpt.latest_checkpoint(Path(output_dir) / common.CHECKPOINTS)


def load_sharded(trainer, directory: Path) -> int:
    """Restore ``trainer`` in place from ``directory``; returns the number of completed iterations."""
    state = dcp_ckpt.load_checkpoint(directory, models=_models(trainer), optimizers=trainer.optimized())
    for name, sched in trainer.schedulers.items():
        sched.load_state_dict(state["schedulers"][name])
    trainer.load_bookkeeping_state(state)
    return int(state["step"])


def write_atomically(runtime, directory, write) -> Path:
    """``write(tmp)`` on every rank (a collective export: rank 0 writes the files) into ``.tmp-NAME`` beside
    ``directory``, then rank 0 swaps it in, so a crash never leaves a half-written ``directory``."""
    import os
    import shutil
    directory = Path(directory)
    tmp = directory.parent / f".tmp-{directory.name}"
    if runtime.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    runtime.barrier()
    write(tmp)
    runtime.barrier()
    if runtime.is_main and tmp.exists():
        old = directory.parent / f".old-{directory.name}"
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    runtime.barrier()
    return directory


def export_policy(trainer, directory) -> Path:
    """The actor's LM in HF format with the tokenizer, streamed from the shards a bucket of layers at a
    time (``engine.checkpoint.export_hf``; LoRA: adapters merged), written atomically (a collective; rank
    0 writes)."""
    return write_atomically(trainer.runtime, directory,
                            lambda tmp: dcp_ckpt.export_hf(trainer.actor, tmp, tokenizer=trainer.tokenizer))
