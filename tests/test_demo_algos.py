"""The arithmetic task, `fastrlhf demo --task arithmetic --algo ...` (its accuracy bar) and `fastrlhf arena`."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import pytest

from fastrlhf import demo, demo_algos
from fastrlhf.config import ConfigError
from fastrlhf.data import arithmetic_task as arith


def test_arithmetic_task_pieces():
    qs = arith.all_questions()
    assert len(qs) == 155 and all(arith.result(a, op, b) >= 0 for a, op, b in qs)
    held = [q for q in qs if arith.split_of(*q) == "heldout"]
    assert 0.1 < len(held) / len(qs) < 0.3
    demos = arith.make_demonstrations(2000, 0)
    assert not any(arith.split_of(*arith.parse_question(r["prompt"])) == "heldout" for r in demos)
    rl_rows, held_rows = arith.make_prompt_rows(2000, 3, "train"), arith.make_prompt_rows(500, 4, "heldout")
    assert not {r["prompt"] for r in rl_rows} & {r["prompt"] for r in held_rows}  # RL prompts never held out
    hard = [arith.is_hard(*arith.parse_question(r["prompt"])) for r in demos]
    for keep, p_right in ((True, arith.P_CORRECT_HARD), (False, arith.P_CORRECT_EASY)):
        rows = [r for r, h in zip(demos, hard, strict=True) if h == keep]
        right = arith.accuracy([r["prompt"] for r in rows], [r["response"] for r in rows])
        assert abs(right - p_right) < 0.05, (keep, right)  # imperfect worked answers
    # on the hard questions every wrong worked answer is the habit: a systematic mistake, not noise
    for r, h in zip(demos, hard, strict=True):
        if h and not arith.is_correct(r["prompt"], r["response"]):
            assert arith.final_number(r["response"]) == arith.habit(*arith.parse_question(r["prompt"])), r
    assert arith.habit(7, "+", 5) == 2 and arith.habit(9, "-", 6) == 4 and not arith.is_hard(9, "-", 4)
    with pytest.raises(ValueError, match="not a hard question"):
        arith.habit(3, "+", 4)
    qs_hard = [q for q in qs if arith.is_hard(*q)]
    assert len(qs_hard) == 60 and any(arith.split_of(*q) == "heldout" for q in qs_hard)
    assert all(r["response"].startswith(" ".join(r["prompt"].split()[2:5]) + " =") for r in demos)
    tok = arith.build_tokenizer()
    assert tok.unk_token_id not in tok(demos[0]["prompt"] + " " + demos[0]["response"]).input_ids
    assert arith.exact_answer_reward(["what is 7 + 5 ?"] * 4, ["7 + 5 = 12", "7 + 5 = 11", "12", "= 12 = 13"],
                                     answer=["12"] * 4) == [1.0, 0.0, 0.0, 0.0]
    assert arith.exact_answer_reward(["what is 9 - 4 ?"], ["9 - 4 = 5"]) == [1.0]  # no answer field
    with pytest.raises(ValueError, match="is not of the form"):
        arith.parse_question("what is seven ?")


def test_rl_configs_share_the_budget():
    base = demo.ppo_config(demo.QUICK, 0, "hf", "/tmp/unused")
    cfgs = {a: demo_algos.rl_config(base, a) for a in ("ppo", "grpo", "rloo", "reinforce_pp")}
    budgets = {a: c.rollout_batch_size * c.rollout.n for a, c in cfgs.items()}
    assert len(set(budgets.values())) == 1 and cfgs["grpo"].rollout.n == demo_algos.GROUP_N
    assert {a: c.advantage_estimator for a, c in cfgs.items()} == {
        "ppo": "gae", "grpo": "grpo", "rloo": "rloo", "reinforce_pp": "reinforce_pp"}
    assert all(c.iterations == base.iterations for c in cfgs.values())
    assert cfgs["grpo"].kl.loss_coef > 0 and cfgs["ppo"].kl.loss_coef == 0


def test_arith_run_record_refuses_other_flags(tmp_path):
    demo_algos.check_arith_run(tmp_path, seed=0, quick=True)
    demo_algos.check_arith_run(tmp_path, seed=0, quick=True)  # same flags: resume
    with pytest.raises(ConfigError, match="--seed 0"):
        demo_algos.check_arith_run(tmp_path, seed=1, quick=True)


TINY_ARITH = demo_algos.ArithSettings(n_demos=400, sft_epochs=2, iterations=2, prompts_per_iter=4, n=4,
                                      n_eval=32, dpo_pairs=64)


@pytest.mark.slow
def test_every_algorithm_runs_on_the_arithmetic_task(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_algos, "ARITH_QUICK", TINY_ARITH)
    for algo in demo_algos.ALGOS:
        summary = demo.run_demo(tmp_path, quick=True, task_name="arithmetic", algo=algo)
        assert summary["task"] == "arithmetic" and summary["algo"] == algo
        rl = summary["rl"]
        for k in ("accuracy", "sampled_accuracy", "greedy_hard", "greedy_easy", "greedy_habit_hard"):
            assert 0 <= rl[f"{k}_before"] <= 1 and 0 <= rl[f"{k}_after"] <= 1, (k, rl)
        assert json.loads((tmp_path / "summary.json").read_text())["algo"] == algo
    # one SFT stage shared by every algorithm, one stage folder each
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(
        ["arith_sft"] + [f"arith_{a}" for a in demo_algos.ALGOS])


@pytest.mark.slow
def test_arithmetic_grpo_demo_raises_heldout_accuracy(tmp_path):
    """The bar: `fastrlhf demo --task arithmetic --algo grpo --quick` raises held-out accuracy, greedy
    (``accuracy_*``) and sampled at temperature 1, well above the SFT policy's, by dropping the demonstrators'
    systematic mistake on questions RL never saw; about a minute on 2 CPU cores (seed 0 measured: greedy
    0.539 -> 0.758, sampled 0.527 -> 0.719, habit on hard held-out questions 0.61 -> 0)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "fastrlhf", "demo", "--quick", "--task", "arithmetic", "--algo",
                           "grpo", "--out", str(tmp_path / "a")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    rl = summary["rl"]
    assert summary["task"] == "arithmetic" and summary["algo"] == "grpo"
    # the SFT policy learned the habit: greedily wrong on the hard held-out questions, right on most others
    assert 0.4 < rl["accuracy_before"] < 0.7 and rl["greedy_hard_before"] < 0.3, rl
    assert rl["greedy_habit_hard_before"] > 0.4 and rl["greedy_easy_before"] > 0.6, rl
    assert rl["accuracy_after"] >= rl["accuracy_before"] + 0.15, rl  # greedy: the policy's best answer
    assert rl["sampled_accuracy_after"] >= rl["sampled_accuracy_before"] + 0.1, rl
    assert rl["greedy_hard_after"] >= rl["greedy_hard_before"] + 0.3 and rl["greedy_habit_hard_after"] < 0.2, rl
    assert rl["greedy_easy_after"] >= rl["greedy_easy_before"] - 0.05, rl  # no loss on what SFT got right
    assert rl["train_reward_last"] > rl["train_reward_first"]
    assert time.time() - start < 300


TINY_PREF = dataclasses.replace(demo.QUICK, n_demos=300, sft_epochs=1, n_pair_prompts=300, rm_epochs=1,
                                ppo_iterations=2, n_eval_prompts=32)


@pytest.mark.slow
def test_arena_quick_writes_one_row_per_algorithm(tmp_path, monkeypatch):
    from fastrlhf.arena import run_arena

    monkeypatch.setattr(demo, "QUICK", TINY_PREF)
    result = run_arena(tmp_path, quick=True)
    rows = result["rows"]
    assert [r["algo"] for r in rows] == list(demo_algos.ALGOS)
    assert len({r["gold_reward_before"] for r in rows}) == 1  # one SFT policy, same held-out prompts
    for r in rows:
        assert math.isfinite(r["gold_reward_after"]) and math.isfinite(r["kl_final"]), r
    assert json.loads((tmp_path / "arena.json").read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / "arena.png").stat().st_size > 5000
    grpo = json.loads((tmp_path / "summary_grpo.json").read_text())
    assert grpo["rl"] == grpo["ppo"] and grpo["rl"]["advantage_estimator"] == "grpo"
    assert grpo["task"] == "preference" and (tmp_path / "grpo" / "final" / "config.json").is_file()
    assert not list((tmp_path / "grpo").glob("checkpoints/*/critic.safetensors"))
    dpo = json.loads((tmp_path / "summary_dpo.json").read_text())
    assert dpo["rl"]["dpo"]["eval_reward_accuracy"] >= 0
