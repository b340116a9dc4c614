"""`fastrlhf arena [--quick] [--out DIR]`: every algorithm on the preference task, same budget, one table.

Each algorithm starts from the same SFT policy and (for the RL ones) the same reward model, trained once in
``DIR`` by the demo's stages; RL algorithms get the same number of iterations and of sampled responses per
iteration (critic-free ones: ``GROUP_N`` responses for each of 1/``GROUP_N`` as many prompts), DPO one epoch
over the reward model's labelled pairs. Every policy is then scored on the same held-out prompts by the hidden
gold reward (never seen by any optimizer) and by its KL to the SFT policy. ``arena.json`` holds one row per
algorithm; ``arena.png`` plots gold reward against KL (the reward-over-optimization frontier, Gao et al. 2022).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from fastrlhf.demo_algos import ALGOS

ROW_KEYS = ("gold_reward_before", "gold_reward_after", "gold_reward_max", "gap_closed", "rm_score_before",
            "rm_score_after", "kl_final", "length_before", "length_after")


def arena_row(algo: str, summary: dict, seconds: float) -> dict:
    rl = summary["rl"]
    row = {"algo": algo, **{k: rl.get(k) for k in ROW_KEYS}, "seconds": seconds}
    for k in ("advantage_estimator", "responses_per_prompt", "prompts_per_iteration", "iterations"):
        if k in rl:
            row[k] = rl[k]
    return row


def plot_arena(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter([0.0], [rows[0]["gold_reward_before"]], marker="s", c="gray", label="SFT policy")
    for r in rows:
        ax.scatter([r["kl_final"]], [r["gold_reward_after"]], s=40, label=r["algo"])
        ax.annotate(r["algo"], (r["kl_final"], r["gold_reward_after"]), textcoords="offset points", xytext=(4, 4))
    ax.axhline(rows[0]["gold_reward_max"], ls="--", c="gray", lw=0.8, label="gold max")
    ax.set_xlabel("KL(policy || SFT), nats per sequence")
    ax.set_ylabel("hidden gold reward (held-out prompts)")
    ax.set_title("arena: gold reward vs KL (Gao et al. 2022 frontier)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_arena(out: str | Path = "runs/arena", *, quick: bool = False, seed: int = 0, rollout: str = "hf",
              algos: tuple[str, ...] = ALGOS) -> dict:
    """Run ``algos`` on the preference task in ``out`` (SFT and reward model shared); returns arena.json's dict."""
    from fastrlhf.demo import _write_json, run_demo

    out = Path(out)
    rows = []
    for algo in algos:
        start = time.time()
        summary = run_demo(out, quick=quick, seed=seed, rollout=rollout, algo=algo)
        _write_json(out / f"summary_{algo}.json", summary)
        rows.append(arena_row(algo, summary, time.time() - start))
    result = {"task": "preference", "quick": quick, "seed": seed, "rollout": rollout, "rows": rows,
              "kl_definition": "mean over held-out prompts of sum_t log pi(y_t) - log pi_SFT(y_t), y ~ pi",
              "note": "seconds of the first row include the shared SFT and reward-model stages"}
    _write_json(out / "arena.json", result)
    plot_arena(rows, out / "arena.png")
    print("\n==== fastrlhf arena (preference task, hidden gold reward) ====")
    print(f"{'algo':14s} {'gold before':>11s} {'gold after':>10s} {'KL':>7s} {'RM after':>9s} {'seconds':>8s}")
    for r in rows:
        print(f"{r['algo']:14s} {r['gold_reward_before']:11.3f} {r['gold_reward_after']:10.3f} "
              f"{r['kl_final']:7.2f} {r['rm_score_after']:9.3f} {r['seconds']:8.0f}")
    return result


def run_arena_cli(args) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    run_arena(args.out, quick=args.quick, seed=args.seed, rollout=args.rollout)
    return 0


def load_arena(out: str | Path) -> dict:
    return json.loads((Path(out) / "arena.json").read_text())
