"""Plots and summaries of a run's ``metrics.jsonl``: ``fastrlhf report RUN_DIR``.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no display, no global
backend switch), so plotting works in headless jobs and inside tests.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from fastrlhf.telemetry.metrics import read_metrics

# Row fields that are bookkeeping, not curves.
META_KEYS = frozenset({"stage", "step", "time"})


def _figure(n_panels: int, *, width: float = 4.2, height: float = 3.0, max_cols: int = 3):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(max_cols, max(n_panels, 1))
    rows = math.ceil(max(n_panels, 1) / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def metric_keys(rows: Iterable[dict]) -> list[str]:
    """Numeric keys present in ``rows`` (first-seen order), bookkeeping fields excluded."""
    keys: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if k not in META_KEYS and _numeric(v):
                keys.setdefault(k)
    return list(keys)


def plot_metrics(rows: Sequence[dict], keys: Sequence[str], path: str | Path, *, title: str | None = None,
                 x: str = "step", max_cols: int = 3) -> Path:
    """One panel per key of ``keys``: its value against ``x`` over the rows that have it.

    ``rows``: metric dicts (e.g. from :func:`read_metrics`, or built in memory). Keys with no finite
    value are skipped; if none is left, ``ValueError``. Writes a PNG to ``path`` and returns it.
    """
    series = {}
    for k in keys:
        pts = [(r[x], r[k]) for r in rows if _numeric(r.get(k)) and _numeric(r.get(x))]
        if pts:
            series[k] = pts
    if not series:
        raise ValueError(f"none of the keys {list(keys)} has a finite value in the {len(rows)} rows given")
    fig, axes = _figure(len(series), max_cols=max_cols)
    for ax, (k, pts) in zip(axes, series.items(), strict=False):
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None, linewidth=1.2)
        ax.set_title(k, fontsize=10)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def plot_reward_histogram(chosen, rejected, path: str | Path, *, title: str = "", bins: int = 30) -> Path:
    """Overlaid histograms of chosen vs rejected rewards (any 1-D tensors / sequences of floats)."""
    c = [float(v) for v in chosen]
    r = [float(v) for v in rejected]
    lo, hi = min(c + r), max(c + r)
    edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)] if hi > lo else bins
    fig, (ax,) = _figure(1, width=6.0, height=4.0)
    ax.hist(c, bins=edges, alpha=0.6, label=f"chosen (mean {sum(c) / len(c):.3f})", color="tab:green")
    ax.hist(r, bins=edges, alpha=0.6, label=f"rejected (mean {sum(r) / len(r):.3f})", color="tab:red")
    ax.set_xlabel("reward")
    ax.set_ylabel("pairs")
    ax.legend()
    ax.set_title(title or "chosen vs rejected rewards", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def summarize(rows: Sequence[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """``{stage: {key: {"first", "last", "min", "max", "n"}}}`` over the finite values of each key."""
    out: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    by_stage: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_stage[r.get("stage", "")].append(r)
    for stage, srows in by_stage.items():
        for k in metric_keys(srows):
            vals = [r[k] for r in srows if _numeric(r.get(k))]
            out[stage][k] = {"first": vals[0], "last": vals[-1], "min": min(vals), "max": max(vals),
                             "n": len(vals)}
    return dict(out)


def varying_keys(rows: Sequence[dict], keys: Iterable[str]) -> list[str]:
    """The keys of ``keys`` whose finite values in ``rows`` are not all equal: a constant series (a memory
    plan entry, a fixed coefficient, a metric logged once) is a flat line or a single dot, not a curve;
    it stays in the printed summary."""
    out = []
    for k in keys:
        vals = {r[k] for r in rows if _numeric(r.get(k))}
        if len(vals) > 1:
            out.append(k)
    return out


def write_report(run_dir: str | Path) -> list[Path]:
    """PNG curves of every stage's train and eval metrics under ``run_dir/plots`` (constant series left
    out, see :func:`varying_keys`); returns the paths."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    by_stage: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_stage[r.get("stage") or "run"].append(r)
    paths = []
    for stage, srows in by_stage.items():
        # A row with an eval_* key is an evaluation row: all its keys (reward_mean, ...) plot as eval.
        is_eval = [any(k.startswith("eval") for k in r) for r in srows]
        eval_keys = metric_keys(r for r, e in zip(srows, is_eval, strict=True) if e)
        groups = {"eval": eval_keys,
                  "train": [k for k in metric_keys(r for r, e in zip(srows, is_eval, strict=True) if not e)
                            if k not in eval_keys]}
        for name, group in groups.items():
            group = varying_keys(srows, group)
            if group:
                paths.append(plot_metrics(srows, group, run_dir / "plots" / f"{stage}_{name}.png",
                                          title=f"{stage} ({name})"))
    return paths


def _format_summary(summary: dict) -> str:
    lines = []
    for stage, keys in summary.items():
        lines.append(f"[{stage or 'run'}]")
        for k, s in keys.items():
            lines.append(f"  {k:<28} last {s['last']:<12.5g} first {s['first']:<12.5g} "
                         f"min {s['min']:<12.5g} max {s['max']:<12.5g} n {s['n']}")
    return "\n".join(lines)


def report_cli(run_dir: str) -> int:
    """``fastrlhf report RUN_DIR``: draw the curves, print a per-stage summary (and summary.json if any)."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        print(f"fastrlhf report: {metrics} not found (is {run_dir} a run directory?)")
        return 1
    rows = read_metrics(metrics)
    if not rows:
        print(f"fastrlhf report: {metrics} has no rows yet")
        return 1
    paths = write_report(run_dir)
    print(_format_summary(summarize(rows)))
    summary = run_dir / "summary.json"
    if summary.is_file():
        print(f"\n{summary}:\n{json.dumps(json.loads(summary.read_text()), indent=2)}")
    print("\nplots:\n" + "\n".join(f"  {p}" for p in paths))
    return 0
