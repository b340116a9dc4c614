"""Metrics to ``metrics.jsonl`` (one JSON object a line) and, when installed, TensorBoard and wandb."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

import torch


def to_float(v: Any) -> float:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().cpu().item())
    return float(v)


class MetricsLogger:
    """Append-only metrics log. ``log(step, {"name": value, ...}, stage="ppo")``.

    Values may be 0-dim tensors (reduced here, once per step, not inside the math). Only rank 0
    should create one with ``enabled=True``; others pass ``enabled=False``.
    """

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True,
                 filename: str = "metrics.jsonl", wandb: bool = False, run_config: dict | None = None):
        self.enabled = enabled
        self.path = Path(out_dir) / filename
        self._tb = self._wandb = None
        if not enabled:
            return
        if wandb:  # asked for: used when installed, one line otherwise
            try:
                import wandb as wandb_lib
                self._wandb = wandb_lib.init(dir=str(out_dir), name=Path(out_dir).name, config=run_config,
                                             resume="allow")
            except ImportError:
                print("[fastrlhf] wandb=true but wandb is not installed: logging to metrics.jsonl"
                      f"{' and TensorBoard' if tensorboard else ''} only", flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except Exception:  # tensorboard not installed: JSONL only
                self._tb = None

    def log(self, step: int, values: Mapping[str, Any], *, stage: str = "") -> dict:
        row = {k: to_float(v) if isinstance(v, (torch.Tensor, int, float)) and not isinstance(v, bool) else v
               for k, v in values.items()}
        if not self.enabled:
            return row
        record = {"stage": stage, "step": int(step), "time": time.time(), **row}
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        scalars = {f"{stage}/{k}" if stage else k: v for k, v in row.items()
                   if isinstance(v, float) and math.isfinite(v)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(step))
        return row

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | Path) -> list[dict]:
    """All rows of a ``metrics.jsonl`` (a torn last line from a crash is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_metrics(path: str | Path, *, stage: str, after_step: int) -> int:
    """Drop the rows of ``stage`` with ``step > after_step`` (a resumed run re-logs them); returns how
    many were dropped. Rows of other stages and a missing file are left alone; a torn line is dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    rows = read_metrics(path)
    keep = [r for r in rows if r.get("stage") != stage or int(r.get("step", 0)) <= after_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in keep))
    tmp.replace(path)
    return len(rows) - len(keep)
