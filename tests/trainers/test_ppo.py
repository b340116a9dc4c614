"""PPOTrainer: hand-checkable pieces of one iteration, micro-batch invariance, skips, early stop, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from fastrlhf.data import build_test_tokenizer
from fastrlhf.models import RewardModel, ValueModel, tiny_llama
from fastrlhf.rollout.base import Generation
from fastrlhf.trainers.ppo import EarlyStopConfig, KLConfig, PPOConfig, PPOTrainer, RolloutConfig
from fastrlhf.trainers.ppo_batch import PPOBatch, build_batch
from tests.trainers.helpers import FixedRollout, crash_and_resume


@pytest.fixture(scope="module")
def tok():
    return build_test_tokenizer()


PROMPTS = ["hello cat", "the big red dog is here", "what", "i like the small green bird"]


def make_trainer(tmp_path, tok, *, rollout=None, reward_model=None, **overrides):
    vocab = len(tok)
    torch.manual_seed(0)  # the reward head's init draws from the global RNG

    def lm(seed):
        return tiny_llama(vocab, seed=seed, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    fields = dict(
        iterations=2,
        rollout_batch_size=4,
        minibatch_size=4,
        ppo_epochs=2,
        actor_lr=1e-3,
        critic_lr=1e-3,
        checkpoint_every=1,
        reward_norm="none",
        kernel_backend="torch",
        rollout=RolloutConfig(max_new_tokens=4),
        early_stop=EarlyStopConfig(score_falling_iters=None),
    )
    fields.update(overrides)
    cfg = PPOConfig(**fields)
    critic = None if cfg.shared_critic else ValueModel(lm(2))
    return PPOTrainer(
        cfg,
        actor=lm(0),
        ref=lm(0),
        reward_model=reward_model or RewardModel(lm(1)),
        critic=critic,
        tokenizer=tok,
        prompts=PROMPTS,
        rollout=rollout,
        output_dir=tmp_path,
    )


RESPONSES = [[20, 21, 1], [22], [23, 24, 25, 26], [27, 1]]  # EOS (id 1) or cut at max_new_tokens


def scored_batch(trainer, responses=RESPONSES):
    ids = [trainer.prompt_ids[i] for i in range(4)]
    batch = build_batch(
        ids,
        Generation(responses, [[-1.0] * len(r) for r in responses]),
        pad_token_id=trainer.tokenizer.pad_token_id,
        device=torch.device("cpu"),
    )
    scores, _ = trainer.score(batch)
    return batch, scores


def test_score_runs_in_micro_batches_and_equals_the_whole_batch(tmp_path, tok):
    whole = make_trainer(tmp_path / "a", tok)
    batch_w, scores_w = scored_batch(whole)
    micro = make_trainer(tmp_path / "b", tok, micro_batch_size=1)
    seen = []
    for name in ("actor", "ref", "critic", "reward_model"):
        getattr(micro, name).register_forward_hook(lambda m, args, out, n=name: seen.append((n, args[0].shape[0])))
    batch_m, scores_m = scored_batch(micro)
    assert sorted(set(seen)) == [("actor", 1), ("critic", 1), ("ref", 1), ("reward_model", 1)]
    torch.testing.assert_close(scores_m, scores_w, atol=1e-5, rtol=1e-5)
    for key in ("old_logprobs", "ref_logprobs", "old_values"):
        torch.testing.assert_close(getattr(batch_m, key), getattr(batch_w, key), atol=1e-5, rtol=1e-5)


def test_score_runs_model_by_model_and_onloads_sequential_models_once(tmp_path, tok):
    """SCORE runs each model over all micro-batches before the next (actor, ref, reward, critic); a model the
    plan marks "sequential" is onloaded before its first forward, ahead of any forward-pre hook (FSDP2's
    all-gather is one, registered with prepend=True), and offloaded after its last: once per SCORE, not
    per micro-batch. On CPU the moves are no-ops; the scheduler's event log records them."""
    from fastrlhf.engine.memory import PHASES, MemoryPlan
    trainer = make_trainer(tmp_path, tok, micro_batch_size=1)
    sched = trainer.runtime.scheduler
    items = [f"{m}.params" for m in ("actor", "critic", "ref", "reward")]
    seq = ("critic.params", "ref.params", "reward.params")
    placement = {p: {i: "sequential" if (p == "score" and i in seq) else "resident" for i in items}
                 for p in PHASES}
    sched.bind(plan=MemoryPlan("cpu", 1, dict.fromkeys(items, 1), placement))
    for name, attr in (("actor", "actor"), ("ref", "ref"), ("reward", "reward_model"), ("critic", "critic")):
        getattr(trainer, attr).register_forward_pre_hook(
            lambda m, args, n=name: sched.events.append(("score", f"forward:{n}")), prepend=True)
    for _ in range(2):  # two iterations' phases
        sched.events.clear()
        with sched.phase("generate"):
            pass
        with sched.phase("score"):
            scored_batch(trainer)
        events = [a for p, a in sched.events if p == "score"]
        forwards = [e.split(":")[1] for e in events if e.startswith("forward:")]
        assert forwards == ["actor"] * 4 + ["ref"] * 4 + ["reward"] * 4 + ["critic"] * 4  # model by model
        for name in ("ref", "reward", "critic"):
            first = events.index(f"forward:{name}")
            last = len(events) - 1 - events[::-1].index(f"forward:{name}")
            assert events.count(f"device:{name}.params") == 1, events  # once per SCORE, not per micro-batch
            assert events.index(f"device:{name}.params") < first  # before any forward-pre hook
            assert events[last + 1] == f"cpu:{name}.params"  # off again right after its last forward
        assert "device:actor.params" not in events and "cpu:actor.params" not in events  # resident: stays
        with sched.phase("train"):  # this plan keeps everything resident in TRAIN: all back on the device
            pass
        with sched.phase("sync"):
            pass


def test_layout_left_padded_prompts_right_padded_responses(tmp_path, tok):
    trainer = make_trainer(tmp_path, tok)
    batch, _ = scored_batch(trainer)
    lengths = [len(r) for r in RESPONSES]
    assert batch.mask.sum(-1).tolist() == lengths
    for i, (p, r) in enumerate(zip(trainer.prompt_ids, RESPONSES, strict=True)):
        assert batch.input_ids[i, batch.prompt_len - len(p) : batch.prompt_len].tolist() == p
        assert batch.responses[i, : len(r)].tolist() == r
        assert batch.attention_mask[i].sum() == len(p) + len(r)


def test_reward_lands_on_last_valid_token(tmp_path, tok):
    """gamma=0.5, lam=1, kl_coef=0, values=0 (zero-initialised critic head): A_t = score * 0.5^(last - t)."""
    trainer = make_trainer(
        tmp_path,
        tok,
        gamma=0.5,
        lam=1.0,
        whiten_advantages=False,
        kl=KLConfig(controller="fixed", init_coef=0.0),
    )
    batch, scores = scored_batch(trainer)
    assert torch.count_nonzero(batch.old_values) == 0
    trainer.advantages(batch, scores)
    for i, r in enumerate(RESPONSES):
        n = len(r)
        expect = torch.tensor([float(scores[i]) * 0.5 ** (n - 1 - t) for t in range(n)])
        torch.testing.assert_close(batch.advantages[i, :n], expect)
        assert torch.count_nonzero(batch.advantages[i, n:]) == 0
        torch.testing.assert_close(batch.returns[i, :n], expect)  # returns = A + V, V = 0


def _pad_wider(batch: PPOBatch, extra: int) -> PPOBatch:
    """The same batch with ``extra`` more padding columns, holding garbage where the layout allows."""
    b = batch.size
    return PPOBatch(
        input_ids=torch.cat([batch.input_ids, torch.full((b, extra), 7)], 1),
        attention_mask=torch.cat([batch.attention_mask, torch.zeros(b, extra, dtype=torch.long)], 1),
        mask=torch.cat([batch.mask, torch.zeros(b, extra, dtype=torch.bool)], 1),
        prompt_len=batch.prompt_len,
        sampler_logprobs=torch.cat([batch.sampler_logprobs, torch.full((b, extra), float("nan"))], 1),
    )


def test_advantage_whitening_ignores_padding(tmp_path, tok):
    trainer = make_trainer(tmp_path, tok, kl=KLConfig(controller="fixed", init_coef=0.1))
    batch, scores = scored_batch(trainer)
    trainer.advantages(batch, scores)
    adv = batch.advantages[batch.mask].double()
    assert abs(adv.mean()) < 1e-6 and abs(adv.std() - 1) < 1e-4  # whitened over valid tokens only
    assert torch.count_nonzero(batch.advantages[~batch.mask]) == 0
    wide = _pad_wider(batch, 3)
    wide_scores, _ = trainer.score(wide)
    torch.testing.assert_close(wide_scores, scores)
    trainer.advantages(wide, wide_scores)
    torch.testing.assert_close(wide.advantages[wide.mask], batch.advantages[batch.mask], atol=1e-6, rtol=1e-6)


def _grads(trainer):
    models = [trainer.actor] + ([trainer.critic] if trainer.critic is not None else [])
    return [p.grad.clone() for m in models for p in m.parameters() if p.grad is not None]


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("shared_critic", [False, True])
def test_minibatch_loss_and_grads_do_not_depend_on_micro_batching(tmp_path, tok, loss_agg, shared_critic):
    losses, grads = [], []
    for micro in (None, 1, 3):
        trainer = make_trainer(
            tmp_path / str(micro),
            tok,
            loss_agg=loss_agg,
            micro_batch_size=micro,
            shared_critic=shared_critic,
            entropy_coef=0.01,
            kl=KLConfig(controller="fixed", init_coef=0.1, loss_coef=0.05),
        )
        batch, scores = scored_batch(trainer)
        trainer.advantages(batch, scores)
        batch.old_logprobs = batch.old_logprobs - 0.3 * batch.mask  # ratios away from 1: clipping active
        loss, stats = trainer.minibatch_loss(batch)
        losses.append(loss)
        grads.append(_grads(trainer))
        assert 0 < stats["clipfrac"] <= 1
    for loss, grad in zip(losses[1:], grads[1:], strict=True):
        torch.testing.assert_close(loss, losses[0], atol=1e-6, rtol=1e-5)
        assert len(grad) == len(grads[0]) > 0
        for g, g0 in zip(grad, grads[0], strict=True):
            torch.testing.assert_close(g, g0, atol=1e-6, rtol=1e-5)


def test_all_non_finite_rewards_stop_the_run_with_a_message(tmp_path, tok):
    from fastrlhf.config import RunError

    class NaNReward(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return torch.full((input_ids.shape[0],), float("nan"))

    trainer = make_trainer(tmp_path, tok, reward_model=NaNReward(), iterations=1)
    before = {k: v.clone() for k, v in trainer.actor.state_dict().items()}
    with pytest.raises(RunError, match="non-finite reward scores: 4 of 4 rows"):
        trainer.train()
    assert all(torch.equal(v, before[k]) for k, v in trainer.actor.state_dict().items())


def test_non_finite_loss_skips_the_step(tmp_path, tok):
    trainer = make_trainer(tmp_path, tok)
    batch, scores = scored_batch(trainer)
    trainer.advantages(batch, scores)
    batch.advantages = torch.where(batch.mask, torch.full_like(batch.advantages, float("inf")), 0.0)
    before = {k: v.clone() for k, v in trainer.actor.state_dict().items()}
    assert trainer.train_minibatch(batch) == {}
    assert trainer.counters["skipped_steps"] == 1
    assert all(torch.equal(v, before[k]) for k, v in trainer.actor.state_dict().items())


def test_early_stop_on_kl_fires_is_logged_and_sticks(tmp_path, tok):
    trainer = make_trainer(
        tmp_path,
        tok,
        iterations=6,
        kl=KLConfig(target=1e-4),
        early_stop=EarlyStopConfig(kl_factor=2.0, score_falling_iters=None),
    )
    rows = trainer.train()
    assert len(rows) < 6 and trainer.stop_state["stopped"].startswith("kl")
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("early_stop" in r for r in logged)
    again = make_trainer(
        tmp_path,
        tok,
        iterations=6,
        kl=KLConfig(target=1e-4),
        early_stop=EarlyStopConfig(kl_factor=2.0, score_falling_iters=None),
    )
    assert again.train() == []  # resumed from the stop checkpoint: nothing more to do


def _state(trainer):
    return {
        **{f"actor.{k}": v for k, v in trainer.actor.state_dict().items()},
        **{f"critic.{k}": v for k, v in trainer.critic.state_dict().items()},
    }


def _comparable(rows):
    return [
        {k: v for k, v in r.items() if not k.startswith(("time", "tokens_per_s", "mem", "plan"))}
        for r in rows
    ]


def test_resume_after_crash_equals_uninterrupted_run(tmp_path, tok, monkeypatch):
    kw = dict(iterations=3, minibatch_size=2, reward_norm="running", checkpoint_every=1)
    full = make_trainer(tmp_path / "a", tok, **kw)
    full.train()
    resumed = crash_and_resume(monkeypatch, lambda: make_trainer(tmp_path / "b", tok, **kw), at=2)
    assert len(resumed.train()) == 1  # only iteration 3 ran

    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in full.optimizers:
        sa, sb = full.optimizers[name].state_dict()["state"], resumed.optimizers[name].state_dict()["state"]
        assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    assert full.kl_ctl.value == resumed.kl_ctl.value
    assert full.moments.state_dict() == resumed.moments.state_dict()
    read = [
        [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        for d in (tmp_path / "a", tmp_path / "b")
    ]
    strip = [[{k: v for k, v in r.items() if k != "time"} for r in rows] for rows in read]
    assert _comparable(strip[0]) == _comparable(strip[1])


def test_checkpoint_policy_loads_with_auto_model(tmp_path, tok):
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tmp_path, tok, iterations=1)
    trainer.train()
    final = trainer.save_final()
    loaded = AutoModelForCausalLM.from_pretrained(final)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, trainer.actor.lm.state_dict()[k])


def test_config_checks(tmp_path, tok):
    with pytest.raises(ValueError, match="minibatch_size"):
        PPOConfig(rollout_batch_size=4, minibatch_size=8)
    with pytest.raises(ValueError, match="kl.controller"):
        PPOConfig(kl=KLConfig(controller="pid"))
    lm = tiny_llama(len(tok))
    with pytest.raises(ValueError, match="critic=None"):  # a critic and shared_critic=True
        PPOTrainer(
            PPOConfig(shared_critic=True),
            actor=lm,
            ref=lm,
            reward_model=RewardModel(lm),
            critic=ValueModel(lm),
            tokenizer=tok,
            prompts=PROMPTS,
            output_dir=tmp_path,
        )


def test_cli_runs_on_saved_models(tmp_path, tok):
    from fastrlhf.trainers.ppo import cli_main

    lm = tiny_llama(len(tok), seed=0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    lm.save_pretrained(tmp_path / "sft")
    tok.save_pretrained(tmp_path / "sft")
    RewardModel(tiny_llama(len(tok), seed=1)).save_pretrained(tmp_path / "rm")
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    config = {
        "model": str(tmp_path / "sft"),
        "reward_model": str(tmp_path / "rm"),
        "data": str(tmp_path / "data.jsonl"),
        "output_dir": str(tmp_path / "out"),
        "iterations": 1,
        "rollout_batch_size": 2,
        "minibatch_size": 2,
        "ppo_epochs": 1,
        "max_prompt_length": 64,  # + max_new_tokens within the tiny model's 256 positions
        "rollout": {"max_new_tokens": 3},
    }
    (tmp_path / "ppo.yaml").write_text(yaml.safe_dump(config))
    assert cli_main(str(tmp_path / "ppo.yaml"), ["kl.target=3.0"]) == 0
    assert (tmp_path / "out" / "final" / "config.json").is_file()
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["iteration"] == 1 and math.isfinite(rows[-1]["kl"])


def test_early_stop_rules_hand_cases():
    from fastrlhf.trainers.ppo_state import early_stop_rule

    def fresh():
        return {"base_length": None, "score_ema": None, "falling": 0, "stopped": None}

    es = EarlyStopConfig(kl_factor=2.0, length_factor=2.0, score_falling_iters=2, score_ema=0.5)
    state = fresh()
    assert early_stop_rule(es, 6.0, state, {"kl": 1.0, "response_length": 5.0, "rm_score": 1.0}) is None
    assert state["base_length"] == 5.0  # the SFT policy's length, from the first iteration
    assert early_stop_rule(es, 6.0, state, {"kl": 12.5, "response_length": 5.0, "rm_score": 1.0}).startswith(
        "kl"
    )
    assert early_stop_rule(es, 6.0, state, {"kl": 1.0, "response_length": 10.5, "rm_score": 1.0}).startswith(
        "response length"
    )
    state = fresh()
    for score in (1.0, 0.0):  # EMA 1.0 -> 0.5: fell once
        assert early_stop_rule(es, 6.0, state, {"kl": 0.0, "response_length": 5.0, "rm_score": score}) is None
    rule = early_stop_rule(es, 6.0, state, {"kl": 0.0, "response_length": 5.0, "rm_score": 0.0})  # 0.25
    assert rule == "RM score EMA fell for 2 iterations"
    off = EarlyStopConfig(kl_factor=None, length_factor=None, score_falling_iters=None)
    assert early_stop_rule(off, 6.0, fresh(), {"kl": 1e9, "response_length": 1e9, "rm_score": -1e9}) is None


def test_gpt2_with_dropout_first_minibatch_has_ratio_one(tmp_path, tok):
    """Dropout is off in PPO (old and new log-probs from the same function), also for GPT-2 (absolute
    positions, left-padded prompts): the first minibatch of the first epoch has ratio exactly 1."""
    from fastrlhf.models import tiny_gpt2

    def gpt2(seed):
        return tiny_gpt2(
            len(tok), seed=seed, dropout=0.3, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
        )

    torch.manual_seed(0)
    cfg = PPOConfig(
        iterations=1,
        rollout_batch_size=4,
        minibatch_size=4,
        ppo_epochs=1,
        reward_norm="none",
        kernel_backend="torch",
        rollout=RolloutConfig(max_new_tokens=4),
    )
    trainer = PPOTrainer(
        cfg,
        actor=gpt2(0),
        ref=gpt2(0),
        reward_model=RewardModel(gpt2(1)),
        critic=ValueModel(gpt2(2)),
        tokenizer=tok,
        prompts=PROMPTS,
        output_dir=tmp_path,
    )
    (row,) = trainer.train()
    assert row["ratio_mean"] == 1.0 and row["approx_kl"] == 0.0 and row["clipfrac"] == 0.0
    assert row["kl"] == 0.0 and row["logprob_mismatch_abs"] < 1e-5


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("shared_critic", [False, True])
def test_packing_equals_padded_score_loss_and_grads(tmp_path, tok, loss_agg, shared_critic):
    """packing=True (the default) vs packing=False: same scores, log-probs, values, loss and gradients."""
    out = []
    for packing in (False, True):
        trainer = make_trainer(tmp_path / str(packing), tok, packing=packing, loss_agg=loss_agg, micro_batch_size=3,
                               shared_critic=shared_critic, entropy_coef=0.01,
                               kl=KLConfig(controller="fixed", init_coef=0.1, loss_coef=0.05))
        calls = []
        trainer.actor.register_forward_pre_hook(lambda m, a, kw: calls.append(kw.get("packing", False)),
                                                with_kwargs=True)
        batch, scores = scored_batch(trainer)
        trainer.advantages(batch, scores)
        batch.old_logprobs = batch.old_logprobs - 0.3 * batch.mask
        loss, stats = trainer.minibatch_loss(batch)
        assert set(calls) == {packing}
        out.append((batch, scores, loss, stats, _grads(trainer)))
    (b0, s0, l0, st0, g0), (b1, s1, l1, st1, g1) = out
    torch.testing.assert_close(s1, s0, atol=1e-5, rtol=1e-5)
    for key in ("old_logprobs", "ref_logprobs", "old_values", "advantages"):
        torch.testing.assert_close(getattr(b1, key), getattr(b0, key), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    for k in st0:
        torch.testing.assert_close(st1[k], st0[k], atol=1e-5, rtol=1e-5)
    assert len(g1) == len(g0) > 0
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
