"""PPOTrainer with the registered algorithms: critic-free estimators (no critic, no value loss), group-relative
advantages over rollout.n adjacent rows, GSPO through PolicyWithLoss, reward functions (row fields, errors
skipped and counted), DAPO's group filter, config errors, and `fastrlhf ppo` with function rewards only."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from fastrlhf.algo import (RewardFunctions, grpo_advantages, gspo_policy_loss, reinforce_pp_advantages,
                           rloo_advantages, token_rewards)
from fastrlhf.config import ConfigError
from fastrlhf.data import build_test_tokenizer
from fastrlhf.models import RewardModel, ValueModel, tiny_llama
from fastrlhf.rollout.base import Generation
from fastrlhf.trainers.ppo import EarlyStopConfig, KLConfig, PPOConfig, PPOTrainer, RolloutConfig
from fastrlhf.trainers.ppo_batch import build_batch
from tests.trainers.helpers import FixedRollout, write_grpo_cli_run

PROMPTS = ["hello cat", "the big red dog is here", "what", "i like the small green bird"]
# 8 rows = 4 prompts x n=2; EOS is id 1
RESPONSES = [[20, 21, 1], [22], [23, 24, 25, 26], [27, 1], [28, 1], [29, 1], [20, 22, 24, 1], [21]]


@pytest.fixture(scope="module")
def tok():
    return build_test_tokenizer()


def n_words(prompts, responses, **row):
    return [float(len(r.split())) for r in responses]


def make(tmp_path, tok, *, reward_fns=None, with_rm=False, fields=None, **overrides):
    torch.manual_seed(0)

    def lm(seed):
        return tiny_llama(len(tok), seed=seed, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    kw = dict(iterations=2, rollout_batch_size=4, minibatch_size=4, ppo_epochs=2, actor_lr=1e-3, critic_lr=1e-3,
              checkpoint_every=1, reward_norm="none", kernel_backend="torch", advantage_estimator="grpo",
              rollout=RolloutConfig(max_new_tokens=4, n=2), early_stop=EarlyStopConfig(score_falling_iters=None),
              progress=False)
    kw.update(overrides)
    cfg = PPOConfig(**kw)
    critic = ValueModel(lm(2)) if cfg.advantage_estimator == "gae" and not cfg.shared_critic else None
    return PPOTrainer(cfg, actor=lm(0), ref=lm(0), reward_model=RewardModel(lm(1)) if with_rm else None,
                      critic=critic, tokenizer=tok, prompts=PROMPTS, rollout=FixedRollout(RESPONSES),
                      output_dir=tmp_path, reward_fns=reward_fns or RewardFunctions([("n_words", n_words, 1.0)]),
                      prompt_fields=fields)


def grouped_batch(trainer):
    ids = [trainer.prompt_ids[i] for i in range(4)]  # 2 responses each (rollout.n), prompt-major
    batch = build_batch(ids, Generation(RESPONSES, [[-1.0] * len(r) for r in RESPONSES]),
                        pad_token_id=trainer.tokenizer.pad_token_id, device=torch.device("cpu"))
    assert batch.group.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    scores, _ = trainer.score(batch, [i for i in range(4) for _ in range(2)])
    return batch, scores


def test_grpo_is_critic_free_and_group_relative(tmp_path, tok):
    trainer = make(tmp_path, tok)
    assert trainer.critic is None and set(trainer.optimizers) == {"actor"}
    assert trainer.actor.value_head is None
    batch, scores = grouped_batch(trainer)
    # response words (EOS dropped): 2, 1, 4, 1, 1, 1, 3, 1 -> groups (2,1) (4,1) (1,1) (3,1)
    torch.testing.assert_close(scores, torch.tensor([2.0, 1, 4, 1, 1, 1, 3, 1]))
    assert torch.count_nonzero(batch.old_values) == 0
    trainer.advantages(batch, scores)
    torch.testing.assert_close(batch.advantages, grpo_advantages(scores, batch.mask, 2))
    # hand check: a group of two with distinct scores gives -+1/sqrt(2) (unbiased std = |a-b|/sqrt(2))
    assert batch.advantages[0, 0] == pytest.approx(1 / math.sqrt(2), rel=1e-5)
    assert torch.all(batch.advantages[4:6] == 0)  # equal scores
    history = trainer.train()
    assert len(history) == 2 and all("vf_loss" not in r and "grad_norm_critic" not in r for r in history)
    assert all(math.isfinite(r["pg_loss"]) and math.isfinite(r["kl"]) for r in history)
    ckpts = sorted((tmp_path / "checkpoints").iterdir())
    assert ckpts and not (ckpts[-1] / "critic.safetensors").exists()


@pytest.mark.parametrize("estimator,policy_loss", [("rloo", "ppo"), ("reinforce_pp", "ppo"),
                                                   ("reinforce_pp_baseline", "ppo"), ("grpo", "gspo"),
                                                   ("gae", "gspo")])
def test_each_algorithm_runs(tmp_path, tok, estimator, policy_loss):
    trainer = make(tmp_path, tok, advantage_estimator=estimator, policy_loss=policy_loss, iterations=1,
                   with_rm=estimator == "gae", loss_agg="seq-mean-token-mean")
    assert (trainer.critic is not None) == (estimator == "gae")
    batch, scores = grouped_batch(trainer)
    trainer.advantages(batch, scores)
    rewards, _ = token_rewards(scores, batch.old_logprobs, batch.ref_logprobs, batch.mask,
                               kl_coef=trainer.kl_ctl.value)
    if estimator == "rloo":
        want = rloo_advantages(torch.where(batch.mask, rewards, 0.0).sum(-1), batch.mask, 2)
        torch.testing.assert_close(batch.advantages, want)
    if estimator == "reinforce_pp":
        torch.testing.assert_close(batch.advantages, reinforce_pp_advantages(rewards, batch.mask))
    (row,) = trainer.train()
    assert math.isfinite(row["pg_loss"]) and ("vf_loss" in row) == (estimator == "gae")
    if policy_loss == "gspo":
        assert "seq_ratio_mean" in row


def test_gspo_loss_through_policy_matches_logprob_formula(tmp_path, tok):
    trainer = make(tmp_path, tok, policy_loss="gspo", clip=0.01, clip_high=0.02, loss_agg="seq-mean-token-mean")
    batch, scores = grouped_batch(trainer)
    trainer.advantages(batch, scores)
    g = torch.Generator().manual_seed(0)  # old log-probs away from the current ones: some sequences clip
    batch.old_logprobs = batch.old_logprobs + 0.02 * torch.randn(batch.old_logprobs.shape, generator=g)
    loss, _ = trainer.minibatch_loss(batch, backward=False)
    lp, _, _ = trainer.actor(batch.input_ids, batch.attention_mask, mode="logprobs", prompt_len=batch.prompt_len)
    want, _ = gspo_policy_loss(lp, batch.old_logprobs, batch.advantages, batch.mask, clip_low=0.01,
                               clip_high=0.02, loss_agg="seq-mean-token-mean")
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_reward_function_error_skips_rollout_and_is_logged_once(tmp_path, tok):
    logs = []

    def broken(prompts, responses, **row):
        raise KeyError("answer")

    fns = RewardFunctions([("broken", broken, 1.0)], log=logs.append)
    trainer = make(tmp_path, tok, reward_fns=fns, iterations=3)
    before = {k: v.clone() for k, v in trainer.actor.state_dict().items()}
    history = trainer.train()
    assert [r["skipped_rollouts"] for r in history] == [1, 2, 3]
    assert history[-1]["reward_errors"] == 3 and len(logs) == 1 and "broken: KeyError" in logs[0]
    for k, v in trainer.actor.state_dict().items():
        assert torch.equal(v, before[k]), k  # nothing was trained on a failed rollout


def test_reward_functions_see_row_fields_and_add_to_the_reward_model(tmp_path, tok):
    seen = []

    def by_answer(prompts, responses, answer, topic):
        seen.append((list(prompts), list(answer), list(topic)))
        return [float(a) for a in answer]

    fields = [{"answer": str(i), "topic": f"t{i}"} for i in range(4)]
    trainer = make(tmp_path, tok, fields=fields, with_rm=True,
                   reward_fns=RewardFunctions([("by_answer", by_answer, 0.5)]))
    batch, scores = grouped_batch(trainer)
    with torch.no_grad():
        rm = trainer.reward_model(batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(scores, rm + 0.5 * torch.tensor([0.0, 0, 1, 1, 2, 2, 3, 3]))
    assert seen[-1][1] == ["0", "0", "1", "1", "2", "2", "3", "3"] and seen[-1][2][2] == "t1"
    assert seen[-1][0][0] == PROMPTS[0]


def test_filter_groups_clears_uniform_groups_from_the_loss(tmp_path, tok):
    trainer = make(tmp_path, tok, filter_groups=True)
    batch, scores = grouped_batch(trainer)
    stats = trainer.advantages(batch, scores)
    assert float(stats["filtered_fraction"]) == pytest.approx(0.25)  # group 2 scores (1, 1)
    kept = trainer._filtered(batch, scores)
    assert not kept.mask[4:6].any() and torch.equal(kept.mask[:4], batch.mask[:4])
    assert batch.mask[4:6].any()  # the logged batch keeps every row
    # the loss is that of the batch without the group: token-mean over the remaining rows
    full, _ = trainer.minibatch_loss(kept, backward=False)
    rows = torch.tensor([0, 1, 2, 3, 6, 7])
    without, _ = trainer.minibatch_loss(batch.select(rows), backward=False)
    torch.testing.assert_close(full, without, rtol=1e-5, atol=1e-6)


def test_config_errors():
    with pytest.raises(ConfigError, match="set rollout.n >= 2"):
        PPOConfig(advantage_estimator="grpo")
    with pytest.raises(ConfigError, match="filter_groups compares"):
        PPOConfig(filter_groups=True)
    with pytest.raises(ConfigError, match="advantage_estimator must be one of"):
        PPOConfig(advantage_estimator="vtrace")
    with pytest.raises(ConfigError, match="policy_loss must be one of"):
        PPOConfig(policy_loss="cispo")
    with pytest.raises(ConfigError, match="critic-free; shared_critic"):
        PPOConfig(advantage_estimator="reinforce_pp", shared_critic=True)
    with pytest.raises(ConfigError, match=r"rewards\[0\] needs exactly one"):
        from fastrlhf.config import from_dict
        from_dict(PPOConfig, {"rewards": [{"function": "a:b", "reward_model": ["x"]}]})
    ok = PPOConfig(advantage_estimator="grpo", rollout=RolloutConfig(n=4), minibatch_size=128,
                   rollout_batch_size=32)
    assert ok.minibatch_size == 128  # counts responses: up to rollout_batch_size * n


def test_critic_passed_to_critic_free_estimator_is_an_error(tmp_path, tok):
    lm = tiny_llama(len(tok), seed=0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    cfg = PPOConfig(advantage_estimator="grpo", rollout=RolloutConfig(n=2), rollout_batch_size=4, minibatch_size=4)
    with pytest.raises(ValueError, match="critic-free: pass critic=None"):
        PPOTrainer(cfg, actor=lm, ref=lm, reward_model=None, critic=ValueModel(lm), tokenizer=tok,
                   prompts=PROMPTS, reward_fns=RewardFunctions([]))


def test_cli_grpo_with_function_reward_only(tmp_path, tok, capsys):
    from fastrlhf.cli import main

    lm = tiny_llama(len(tok), seed=0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    config = write_grpo_cli_run(tmp_path, lm, tok, PROMPTS)
    assert main(["ppo", "--config", str(tmp_path / "ppo.yaml")]) == 0
    out_rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert out_rows[-1]["iteration"] == 1 and out_rows[-1]["rm_score"] == 0.0  # no "=" in random answers
    assert not (tmp_path / "out" / "checkpoints").exists() or not list(
        (tmp_path / "out" / "checkpoints").glob("*/critic.safetensors"))
    capsys.readouterr()
    config["rewards"] = [{"function": "fastrlhf.data.arithmetic_task:no_such_fn"}]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    assert main(["ppo", "--config", str(tmp_path / "bad.yaml"), f"output_dir={tmp_path / 'o2'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rewards[0].function" in err[0] and "no_such_fn" in err[0]


def test_build_rewards_ensembles_and_weights(tmp_path, tok):
    from fastrlhf.config import from_dict
    from fastrlhf.trainers.ppo_rewards import build_rewards

    torch.manual_seed(0)
    rms = [RewardModel(tiny_llama(len(tok), seed=s)) for s in (1, 2)]
    for i, rm in enumerate(rms):
        rm.save_pretrained(tmp_path / f"rm{i}")
    cfg = from_dict(PPOConfig, {"reward_model": str(tmp_path / "rm0"), "rewards": [
        {"reward_model": [str(tmp_path / "rm0"), str(tmp_path / "rm1")], "reduce": "min", "weight": 2.0},
        {"function": "fastrlhf.data.arithmetic_task:exact_answer_reward", "weight": 3.0}]})
    model, fns = build_rewards(cfg)
    ids = torch.randint(8, len(tok), (3, 6))
    attn = torch.ones_like(ids)
    with torch.no_grad():
        a, b = (rm(ids, attn) for rm in rms)
        torch.testing.assert_close(model(ids, attn), a + 2.0 * torch.minimum(a, b), rtol=1e-5, atol=1e-5)
    assert fns(["what is 1 + 2 ?"], ["1 + 2 = 3"], [{"answer": "3"}]).tolist() == [3.0]
    with pytest.raises(ConfigError, match="`reward_model` or `rewards` is required"):
        build_rewards(PPOConfig())
