"""Pieces several trainer tests share: a fixed-response rollout engine, good/bad preference pairs, a
crash-and-resume driver, and the files of a tiny `fastrlhf ppo` GRPO run."""
from __future__ import annotations

import json
import random

import yaml

from fastrlhf.data.tokenizer import TEST_WORDS
from fastrlhf.rollout.base import Generation

WORDS = [w for w in TEST_WORDS if w not in ("good", "bad")]


class FixedRollout:
    """A RolloutEngine returning fixed responses (cycled; ``params.n`` per prompt, prompt-major), to control
    response lengths exactly."""

    shares_actor_weights = True

    def __init__(self, responses):
        self.responses = responses

    def generate(self, prompt_ids, params):
        toks = [self.responses[i % len(self.responses)] for i in range(len(prompt_ids) * params.n)]
        return Generation(toks, [[-1.0] * len(t) for t in toks])

    def update_weights(self, named_tensors):
        pass

    def sleep(self, level=1):
        pass

    def wake(self):
        pass


def good_bad_pairs(n: int, seed: int, words: tuple[int, int]) -> list[dict]:
    """Preference rows: the chosen response has "good" where the rejected one has "bad", at a random position
    among ``words[0]..words[1]`` random words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        base = [rng.choice(WORDS) for _ in range(rng.randint(*words))]
        i = rng.randint(0, len(base))
        rows.append({"prompt": "say " + rng.choice(WORDS), "chosen": " ".join(base[:i] + ["good"] + base[i:]),
                     "rejected": " ".join(base[:i] + ["bad"] + base[i:])})
    return rows


def crash_and_resume(monkeypatch, make, *, at: int):
    """``make()`` a trainer whose ``train()`` raises at iteration ``at`` (after the checkpoints before it),
    then ``make()`` another on the same folder: returned, for the caller to resume with ``train()``."""
    from fastrlhf.trainers.ppo import PPOTrainer
    real = PPOTrainer.iteration

    def crash(self, it):
        if it == at:
            raise RuntimeError("simulated crash")
        return real(self, it)

    crashed = make()
    monkeypatch.setattr(PPOTrainer, "iteration", crash)
    try:
        crashed.train()
        raise AssertionError(f"the run did not reach iteration {at}")
    except RuntimeError as err:
        assert "simulated crash" in str(err), err
    finally:
        monkeypatch.setattr(PPOTrainer, "iteration", real)
    return make()


def write_grpo_cli_run(root, lm, tok, prompts, **extra) -> dict:
    """``root/sft`` (``lm`` + ``tok``), ``root/data.jsonl`` (prompts with answers) and ``root/ppo.yaml``: a
    one-iteration GRPO run with the arithmetic task's exact-answer reward function; returns the config."""
    lm.save_pretrained(root / "sft")
    tok.save_pretrained(root / "sft")
    rows = [{"prompt": p, "answer": str(i)} for i, p in enumerate(prompts)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"model": str(root / "sft"), "data": str(root / "data.jsonl"),
              "output_dir": str(root / "out"), "iterations": 1, "rollout_batch_size": 2,
              "minibatch_size": 4, "ppo_epochs": 1, "advantage_estimator": "grpo", "progress": False,
              "max_prompt_length": 16, "rollout": {"max_new_tokens": 3, "n": 2},
              "rewards": [{"function": "fastrlhf.data.arithmetic_task:exact_answer_reward", "weight": 1.0}],
              **extra}
    (root / "ppo.yaml").write_text(yaml.safe_dump(config))
    return config
