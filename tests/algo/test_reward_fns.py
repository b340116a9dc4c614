"""Reward functions: loading by "module:name", weighted combination with row fields, a function that
raises or returns non-finite values (rollout skipped: NaN scores, counted, error logged once)."""
from __future__ import annotations

import math

import pytest
import torch

from fastrlhf.algo import RewardFunctions, WeightedRewardModels, load_reward_function


def length_reward(prompts, responses, **row):
    return [float(len(r)) for r in responses]


def answer_reward(prompts, responses, answer, **row):
    return [1.0 if r.strip() == a else 0.0 for r, a in zip(responses, answer)]


def test_load_reward_function():
    assert load_reward_function("math:sqrt") is math.sqrt
    with pytest.raises(ValueError, match=r"rewards\[0\]: function must be 'module:name'"):
        load_reward_function("math.sqrt", where="rewards[0]")
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod'"):
        load_reward_function("no_such_mod:f")
    with pytest.raises(ValueError, match="has no callable 'nope'"):
        load_reward_function("math:nope")


def test_weighted_combination_with_row_fields():
    fns = RewardFunctions([("len", length_reward, 0.5), ("ans", answer_reward, 2.0)])
    got = fns(["p1", "p2"], ["12", "abc"], [{"prompt": "p1", "answer": "12"}, {"prompt": "p2", "answer": "x"}])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([0.5 * 2 + 2.0, 0.5 * 3]))


def test_errors_skip_count_and_log_once():
    logs = []
    calls = {"n": 0}

    def broken(prompts, responses, **row):
        calls["n"] += 1
        raise RuntimeError("boom")

    fns = RewardFunctions([("len", length_reward, 1.0), ("broken", broken, 1.0)], log=logs.append)
    for _ in range(3):
        assert torch.isnan(fns(["p"], ["r"])).all()
    assert fns.errors == 3 and calls["n"] == 3
    assert len(logs) == 1 and "broken: RuntimeError: boom" in logs[0]

    fns = RewardFunctions([("inf", lambda p, r, **k: [1.0, float("inf")], 1.0)], log=logs.append)
    assert torch.isnan(fns(["a", "b"], ["x", "y"])).all() and fns.errors == 1
    assert "non-finite" in logs[-1]
    fns = RewardFunctions([("short", lambda p, r, **k: [1.0], 1.0)], log=logs.append)
    assert torch.isnan(fns(["a", "b"], ["x", "y"])).all() and "returned 1 values for 2" in logs[-1]


def test_weighted_reward_models():
    class Const(torch.nn.Module):
        def __init__(self, v):
            super().__init__()
            self.v = v

        def forward(self, ids, mask):
            return torch.full((ids.shape[0],), self.v)

    m = WeightedRewardModels([Const(1.0), Const(3.0)], [0.5, 2.0])
    torch.testing.assert_close(m(torch.zeros(2, 3), None), torch.tensor([6.5, 6.5]))
    with pytest.raises(ValueError, match="one weight per reward model"):
        WeightedRewardModels([Const(1.0)], [1.0, 2.0])
