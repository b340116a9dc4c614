"""Shared trainer plumbing: device and autocast choice, seeding, optimizer and schedule, grad clipping,
RNG state, atomic checkpoint directories and resume bookkeeping.

Everything here takes explicit arguments (no config objects, no globals), so SFT, reward-model and PPO
trainers share it. Checkpoint layout used by the trainers:

    output_dir/checkpoints/step-00000010/   model files + trainer_state.pt, written atomically
    output_dir/final/                        the final model (from_pretrained loads it)
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import get_scheduler

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")
TRAINER_STATE = "trainer_state.pt"


# ----------------------------------------------------------------------------------------------- device
def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None -> CUDA when available else CPU; anything else as given ("cpu", "cuda:1")."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return dev


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``bf16``; a no-op otherwise (CPU runs stay fp32, as tests expect)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------- seed
def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Snapshot of every RNG a trainer touches (restore with :func:`set_rng_state`)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------- optimizer, schedule
def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and norm weights (ndim < 2)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, *, num_training_steps: int,
                    warmup_ratio: float = 0.0):
    """``transformers.get_scheduler(name)`` with ``ceil(warmup_ratio * num_training_steps)`` warmup steps.

    ``name`` is any transformers schedule ("cosine", "linear", "constant_with_warmup", ...).
    """
    if num_training_steps < 1:
        raise ValueError(f"num_training_steps must be >= 1, got {num_training_steps}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    warmup = math.ceil(warmup_ratio * num_training_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=num_training_steps)


def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Clip the global L2 grad norm to ``max_norm`` (None or <= 0: measure only). Returns the norm
    before clipping as a 0-dim fp32 tensor (no host sync here)."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros((), dtype=torch.float32)
    if max_norm is None or max_norm <= 0:
        return torch.nn.utils.get_total_norm([p.grad for p in params]).float()
    return torch.nn.utils.clip_grad_norm_(params, max_norm).float()


# ------------------------------------------------------------------------------------------ checkpoints
@contextlib.contextmanager
def atomic_save_dir(final_dir: str | Path) -> Iterator[Path]:
    """Write a directory atomically: yields a temporary sibling; on success it is renamed to ``final_dir``.

    A crash inside the block leaves ``final_dir`` as it was (the half-written temp dir is removed, or
    left with a ``.tmp-`` prefix that :func:`latest_checkpoint` ignores). An existing ``final_dir`` is
    replaced only after the new one is complete.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.parent / f".tmp-{final_dir.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final_dir.exists():
        old = final_dir.parent / f".old-{final_dir.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final_dir, old)
    os.replace(tmp, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step-{step:08d}"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``output_dir/checkpoints`` (or None)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), d) for d in root.iterdir()
             if (m := _STEP_DIR.match(d.name)) and (d / TRAINER_STATE).is_file()]
    return max(found)[1] if found else None


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest step checkpoints (keep <= 0: keep all)."""
    root = Path(output_dir) / CHECKPOINTS
    if keep <= 0 or not root.is_dir():
        return
    found = sorted((int(m.group(1)), d) for d in root.iterdir() if (m := _STEP_DIR.match(d.name)))
    for _, d in found[:-keep]:
        shutil.rmtree(d, ignore_errors=True)


def save_trainer_state(directory: str | Path, *, step: int, optimizer: torch.optim.Optimizer | None = None,
                       scheduler: Any = None, extra: dict | None = None) -> None:
    """Optimizer, scheduler, step, every RNG and ``extra`` into ``directory/trainer_state.pt``.

    Write this last inside :func:`atomic_save_dir`: its presence marks the checkpoint complete.
    """
    state = {"step": int(step), "rng": rng_state(), "extra": extra or {},
             "optimizer": optimizer.state_dict() if optimizer is not None else None,
             "scheduler": scheduler.state_dict() if scheduler is not None else None}
    torch.save(state, Path(directory) / TRAINER_STATE)


def load_trainer_state(directory: str | Path, *, optimizer: torch.optim.Optimizer | None = None,
                       scheduler: Any = None, restore_rng: bool = True) -> dict:
    """Inverse of :func:`save_trainer_state`; returns ``{"step", "extra", ...}``."""
    state = torch.load(Path(directory) / TRAINER_STATE, map_location="cpu", weights_only=False)
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return state


def num_optimizer_steps(num_rows: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of a run: ``epochs * ceil(num_rows / batch_size)`` (last partial batch kept)."""
    if num_rows < 1:
        raise ValueError("no training rows")
    return epochs * math.ceil(num_rows / batch_size)


def epoch_order(num_rows: int, *, seed: int, epoch: int) -> list[int]:
    """The row order of ``epoch``: a permutation fixed by (seed, epoch), so a resumed run sees the same
    batches as one that never stopped, whatever the global RNG did in between."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_rows, generator=g).tolist()


def micro_batches(indices: list[int], micro_batch_size: int) -> list[list[int]]:
    return [indices[i:i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]
