"""The trainer's use of the rollout: n responses per prompt, TIS against a perturbed sampler, the
missing-EOS penalty and truncated_fraction in the metrics."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fastrlhf.data import build_test_tokenizer
from fastrlhf.models import RewardModel, ValueModel, tiny_llama
from fastrlhf.rollout.base import Generation
from fastrlhf.rollout.hf import HFRollout
from fastrlhf.trainers import ppo as ppo_module
from fastrlhf.trainers.ppo import EarlyStopConfig, PPOConfig, PPOTrainer, RolloutConfig
from fastrlhf.trainers.ppo_batch import build_batch

PROMPTS = ["hello cat", "the big red dog is here", "what", "i like the small green bird"]


@pytest.fixture(scope="module")
def tok():
    return build_test_tokenizer()


def make_trainer(tmp_path, tok, engine=None, reward_model=None, **overrides):
    def lm(seed):
        return tiny_llama(len(tok), seed=seed, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    torch.manual_seed(0)
    fields = dict(iterations=1, rollout_batch_size=2, minibatch_size=4, micro_batch_size=2, ppo_epochs=1,
                  actor_lr=1e-3, critic_lr=1e-3, reward_norm="none", kernel_backend="torch", max_prompt_length=32,
                  rollout=RolloutConfig(max_new_tokens=5, n=4), early_stop=EarlyStopConfig(score_falling_iters=None),
                  progress=False)
    fields.update(overrides)
    return PPOTrainer(PPOConfig(**fields), actor=lm(0), ref=lm(0), reward_model=reward_model or RewardModel(lm(1)),
                      critic=ValueModel(lm(2)), tokenizer=tok, prompts=PROMPTS, rollout=engine,
                      output_dir=tmp_path)


class HotSampler(HFRollout):
    """A deliberately perturbed sampler: samples (and reports log-probs) at another temperature than the
    trainer's, as a mismatched inference engine would."""

    def __init__(self, model, tok, temperature):
        super().__init__(model, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        self.hot = temperature

    def generate(self, prompt_ids, params):
        return super().generate(prompt_ids, dataclasses.replace(params, temperature=self.hot))


def test_n_responses_per_prompt_through_an_iteration(tmp_path, tok):
    """rollout.n = 4 with 2 prompts per rank: 8 rows, minibatch_size 4 rows, groups adjacent; the metrics
    row carries truncated_fraction and (with rollout_correction=tis) the capped share."""
    trainer = make_trainer(tmp_path, tok, rollout_correction="tis")
    seen = []
    orig = trainer.train_epochs
    trainer.train_epochs = lambda batch, it: (seen.append(batch), orig(batch, it))[1]
    rows = trainer.train()
    (batch,) = seen
    assert batch.size == 8 and batch.group.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    prompt_part = batch.input_ids[:, : batch.prompt_len]
    assert all(torch.equal(prompt_part[i], prompt_part[4 * (i // 4)]) for i in range(8))
    assert rows[0]["truncated_fraction"] == pytest.approx(batch.truncated.float().mean().item())
    assert math.isfinite(rows[0]["pg_loss"])
    assert 0 <= rows[0]["tis_capped_fraction"] <= 1 and rows[0]["tis_weight_mean"] > 0


def test_tis_with_a_perturbed_sampler_equals_the_reference_formula(tmp_path, tok):
    """Sampler at temperature 1.6, trainer at 1.0: w = min(exp(old - sampler), cap=1.05) per token (a random tiny
    model is near-uniform, so the ratios stay within ~10% of 1); the
    advantages the loss sees are the unweighted ones times w, the policy loss of the first minibatch
    (ratio 1) is -sum(w A) / n, and the capped share is logged."""
    trainer = make_trainer(tmp_path, tok, rollout_correction="tis", tis_cap=1.05)
    trainer.rollout = HotSampler(trainer.actor, tok, 1.6)
    prompts = [trainer.prompt_ids[i] for i in trainer._prompt_rows(0)]
    gen = trainer.rollout.generate(prompts, trainer._sampling_params(0))
    batch = build_batch(prompts, gen, pad_token_id=tok.pad_token_id, device=torch.device("cpu"),
                        eos_token_ids=trainer.eos_token_ids)
    scores, _ = trainer.score(batch)
    stats = trainer.advantages(batch, scores)
    weighted = batch.advantages.clone()
    trainer.config = dataclasses.replace(trainer.config, rollout_correction="none")
    trainer.advantages(batch, scores)
    plain = batch.advantages
    mask = batch.mask
    ratio = torch.exp(batch.old_logprobs - batch.sampler_logprobs)
    w = torch.where(mask, ratio.clamp(max=1.05), 1.0)
    assert 0 < ((ratio > 1.05) & mask).sum() < mask.sum()  # the perturbation makes the cap bite, not always
    torch.testing.assert_close(weighted, plain * w)
    assert stats["tis_capped_fraction"].item() == pytest.approx(((ratio > 1.05) & mask).sum().item() / mask.sum().item())
    batch.advantages = weighted
    _, st = trainer._micro_loss(batch)
    torch.testing.assert_close(st["pg_loss"], -(weighted[mask]).sum() / mask.sum(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(st["pg_loss"], -(plain * w)[mask].sum() / mask.sum(), atol=1e-6, rtol=1e-5)


def test_missing_eos_penalty_reaches_exactly_the_truncated_rows(tmp_path, tok, monkeypatch):
    eos = tok.eos_token_id

    class Fixed:
        shares_actor_weights = True

        def generate(self, prompt_ids, params):  # rows 0, 2 finished; 1, 3 cut at max_new_tokens
            toks = [[7, eos], [7, 8, 9, 10, 11], [eos], [12, 13, 14, 15, 16]]
            rows = [toks[i % 4] for i in range(len(prompt_ids) * params.n)]
            return Generation(rows, [[-1.0] * len(t) for t in rows])

        def sleep(self, level=1):
            pass

        def wake(self, tags=None):
            pass

    trainer = make_trainer(tmp_path, tok, engine=Fixed(), missing_eos_penalty=2.5,
                           rollout=RolloutConfig(max_new_tokens=5, n=2))
    seen = {}
    orig_norm = ppo_module.normalize_rewards
    monkeypatch.setattr(ppo_module, "normalize_rewards", lambda s, **kw: (seen.setdefault("s", s), orig_norm(s, **kw))[1])
    orig_score = trainer.score
    trainer.score = lambda batch, *rows: (lambda out: (seen.setdefault("raw", out[0]), out)[1])(orig_score(batch, *rows))
    rows = trainer.train()
    assert rows[0]["truncated_fraction"] == 0.5
    torch.testing.assert_close(seen["s"], seen["raw"] - 2.5 * torch.tensor([0.0, 1.0, 0.0, 1.0]))


class Level2Engine(HFRollout):
    """An engine with its own weight copy and sleep level 2 semantics (weights gone after sleep until a
    sync), generating with a private copy of the actor that only update_weights refreshes."""

    shares_actor_weights = False
    sleep_level = 2

    def __init__(self, model, tok):
        import copy
        super().__init__(copy.deepcopy(model), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        self.weights_valid, self.asleep, self.syncs = False, set(), 0

    def generate(self, prompt_ids, params):
        assert self.weights_valid and not self.asleep, "generate on discarded weights"
        return super().generate(prompt_ids, params)

    def update_weights(self, named_tensors):
        self.model.load_state_dict(dict(named_tensors))
        self.weights_valid, self.syncs = True, self.syncs + 1

    def sleep(self, level=2):
        self.asleep, self.weights_valid = {"weights", "kv_cache"}, False

    def wake(self, tags=None):
        self.asleep -= set(tags or self.asleep)


def test_one_sync_at_start_up_and_a_level_2_engine_is_refilled_before_generating(tmp_path, tok):
    """Start-up syncs once; every trained iteration syncs once; a generation that follows a SCORE with no
    update since (an early stop, an evaluation) first refills the engine sleep level 2 emptied."""
    trainer = make_trainer(tmp_path, tok, iterations=2)
    engine = Level2Engine(trainer.actor, tok)
    trainer.rollout = engine
    sched = trainer.runtime.scheduler
    sched.bind(rollout=engine)
    trainer.train()
    assert engine.syncs == 1 + 2
    for phase in ("generate", "score"):  # a rollout that stopped before its update
        with sched.phase(phase):
            pass
    assert not engine.weights_valid
    row = trainer.iteration(2)
    assert engine.syncs == 3 + 1 + 1 and math.isfinite(row["pg_loss"])  # refill, then the regular sync
