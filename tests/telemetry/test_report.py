"""telemetry.report (plots, summaries, `report_cli`) and metrics.truncate_metrics."""
from __future__ import annotations

import json
import math

import pytest
import torch

from fastrlhf.telemetry.metrics import MetricsLogger, read_metrics, truncate_metrics
from fastrlhf.telemetry.report import (
    metric_keys,
    plot_metrics,
    plot_reward_histogram,
    report_cli,
    summarize,
    write_report,
)

PNG = b"\x89PNG"


def _rows():
    rows = [{"stage": "ppo", "step": s, "time": 0.0, "kl": 0.1 * s, "reward": math.sin(s), "note": "x"}
            for s in range(1, 6)]
    rows.append({"stage": "ppo", "step": 5, "time": 0.0, "eval_gold": 0.5, "kl": float("nan")})
    return rows


def test_plot_metrics_writes_a_png(tmp_path):
    path = plot_metrics(_rows(), ["kl", "reward", "missing"], tmp_path / "sub" / "p.png", title="t")
    assert path.read_bytes()[:4] == PNG
    with pytest.raises(ValueError, match="none of the keys"):
        plot_metrics(_rows(), ["missing"], tmp_path / "q.png")


def test_reward_histogram_accepts_tensors_and_constant_scores(tmp_path):
    p = plot_reward_histogram(torch.randn(50) + 1, torch.randn(50), tmp_path / "h.png")
    assert p.read_bytes()[:4] == PNG
    assert plot_reward_histogram([1.0, 1.0], [1.0], tmp_path / "c.png").is_file()


def test_summarize_skips_nan_and_strings():
    s = summarize(_rows())["ppo"]
    assert metric_keys(_rows()) == ["kl", "reward", "eval_gold"]
    assert s["kl"]["n"] == 5
    assert s["kl"]["last"] == pytest.approx(0.5) and s["kl"]["min"] == pytest.approx(0.1)
    assert s["eval_gold"] == {"first": 0.5, "last": 0.5, "min": 0.5, "max": 0.5, "n": 1}


def test_report_cli_on_a_logged_run(tmp_path, capsys):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 4):
        log.log(step, {"loss": torch.tensor(1.0 / step), "lr": 1e-5}, stage="sft")
        log.log(step, {"loss": 2.0 / step, "accuracy": 0.5 + 0.1 * step}, stage="rm")
    log.log(2, {"eval_accuracy": 0.7}, stage="rm")
    log.log(3, {"eval_accuracy": 0.8}, stage="rm")
    log.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"stage": "rm", "step": 4, "lo')  # a torn line from a crash
    (tmp_path / "summary.json").write_text(json.dumps({"rm.heldout_accuracy": 0.8}))
    assert report_cli(str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "[sft]" in out and "[rm]" in out and "rm.heldout_accuracy" in out
    for name in ("sft_train.png", "rm_train.png", "rm_eval.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == PNG
    assert not (tmp_path / "plots" / "sft_eval.png").exists()
    assert len(write_report(tmp_path)) == 3


def test_report_cli_without_metrics(tmp_path, capsys):
    assert report_cli(str(tmp_path)) == 1
    assert "not found" in capsys.readouterr().out
    (tmp_path / "metrics.jsonl").write_text("")
    assert report_cli(str(tmp_path)) == 1


def test_truncate_metrics_keeps_other_stages(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 5):
        log.log(step, {"loss": step}, stage="sft")
    log.log(9, {"loss": 1}, stage="rm")
    assert truncate_metrics(tmp_path / "metrics.jsonl", stage="sft", after_step=2) == 2
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["stage"], r["step"]) for r in rows] == [("sft", 1), ("sft", 2), ("rm", 9)]
    assert truncate_metrics(tmp_path / "absent.jsonl", stage="sft", after_step=0) == 0
