"""``max_tokens_per_micro_batch``: SCORE and TRAIN micro-batches by a token budget (balanced bin-packing)
compute exactly what row micro-batches compute (fp32): scores, log-probs, values, loss and gradients."""

from __future__ import annotations

import pytest
import torch

from fastrlhf.config import ConfigError
from fastrlhf.data import build_test_tokenizer
from fastrlhf.models import RewardModel, ValueModel, tiny_llama
from fastrlhf.rollout.base import Generation
from fastrlhf.trainers.ppo import PPOConfig, PPOTrainer, RolloutConfig
from fastrlhf.trainers.ppo_batch import build_batch

PROMPTS = ["hello cat", "the big red dog is here", "what", "i like the small green bird", "red", "big dog"]
RESPONSES = [[20, 21, 1], [22], [23, 24, 25, 26], [27, 1], [28, 29], [30, 31, 32]]
BUDGET = 16  # max_prompt_length 12 + max_new_tokens 4: the longest row fits, most pairs of rows do not


@pytest.fixture(scope="module")
def tok():
    return build_test_tokenizer()


def make(tmp_path, tok, packing=True, **overrides):
    torch.manual_seed(0)

    def lm(seed):
        return tiny_llama(len(tok), seed=seed, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    cfg = PPOConfig(iterations=1, rollout_batch_size=6, minibatch_size=6, max_prompt_length=12,
                    kernel_backend="torch", reward_norm="none", packing=packing,
                    rollout=RolloutConfig(max_new_tokens=4), **overrides)
    return PPOTrainer(cfg, actor=lm(0), ref=lm(3), reward_model=RewardModel(lm(1)), critic=ValueModel(lm(2)),
                      tokenizer=tok, prompts=PROMPTS, output_dir=tmp_path)


def _scored(trainer):
    ids = [trainer.prompt_ids[i] for i in range(len(PROMPTS))]
    batch = build_batch(ids, Generation(RESPONSES, [[-1.0] * len(r) for r in RESPONSES]),
                        pad_token_id=trainer.tokenizer.pad_token_id, device=torch.device("cpu"))
    scores, _ = trainer.score(batch)
    trainer.advantages(batch, scores)
    return batch, scores


def _grads(trainer, batch):
    for opt in trainer.optimizers.values():
        opt.zero_grad(set_to_none=True)
    loss, stats = trainer.minibatch_loss(batch)
    grads = {f"{m}.{n}": p.grad.clone() for m, model in (("a", trainer.actor), ("c", trainer.critic))
             for n, p in model.named_parameters() if p.grad is not None}
    return loss, stats, grads


@pytest.mark.parametrize("packing", [True, False])
def test_token_budget_micro_batches_equal_row_micro_batches(tmp_path, tok, packing, monkeypatch):
    rows = make(tmp_path / "rows", tok, packing=packing)
    budget = make(tmp_path / "tokens", tok, packing=packing, max_tokens_per_micro_batch=BUDGET)
    b_rows, s_rows = _scored(rows)
    b_tok, s_tok = _scored(budget)

    lengths = b_tok.attention_mask.sum(-1)
    bins = budget._micro_rows(b_tok.attention_mask)
    assert len(bins) >= 3 and not any(pad for _, pad in bins)
    assert sorted(torch.cat([r for r, _ in bins]).tolist()) == list(range(len(PROMPTS)))
    assert all(int(lengths[r].sum()) <= BUDGET for r, _ in bins)

    torch.testing.assert_close(s_tok, s_rows, rtol=1e-5, atol=1e-6)
    for key in ("old_logprobs", "ref_logprobs", "old_values", "advantages", "returns"):
        torch.testing.assert_close(getattr(b_tok, key), getattr(b_rows, key), rtol=1e-5, atol=1e-6)

    loss_r, stats_r, grads_r = _grads(rows, b_rows)
    loss_t, stats_t, grads_t = _grads(budget, b_tok)
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-5, atol=1e-6)
    assert grads_t.keys() == grads_r.keys() and len(grads_t) > 0
    for k in grads_r:
        torch.testing.assert_close(grads_t[k], grads_r[k], rtol=1e-4, atol=1e-6)
    for k in stats_r:
        torch.testing.assert_close(stats_t[k], stats_r[k], rtol=1e-4, atol=1e-6)

    # a padding micro-batch (what a rank short of rows runs so every rank runs as many): weight 0
    import fastrlhf.models.packing as packing_mod
    real = packing_mod.balanced_micro_batches
    monkeypatch.setattr(packing_mod, "balanced_micro_batches",  # as if another rank needed one bin per row + 1
                        lambda lengths, t, min_bins=1: real(lengths, t, min_bins=max(min_bins, len(lengths) + 1)))
    padded = budget._micro_rows(b_tok.attention_mask)
    assert len(padded) == len(PROMPTS) + 1 and sum(pad for _, pad in padded) == 1
    b_pad, s_pad = _scored(budget)  # SCORE drops the padding micro-batch's outputs
    torch.testing.assert_close(s_pad, s_rows, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b_pad.old_logprobs, b_rows.old_logprobs, rtol=1e-5, atol=1e-6)
    loss_p, _, grads_p = _grads(budget, b_tok)
    torch.testing.assert_close(loss_p, loss_r, rtol=1e-5, atol=1e-6)
    for k in grads_r:
        torch.testing.assert_close(grads_p[k], grads_r[k], rtol=1e-4, atol=1e-6)


def test_token_budget_config_errors():
    with pytest.raises(ConfigError, match="not both"):
        PPOConfig(micro_batch_size=2, max_tokens_per_micro_batch=2048)
    with pytest.raises(ConfigError, match="max_tokens_per_micro_batch must hold the longest row"):
        PPOConfig(max_prompt_length=12, rollout=RolloutConfig(max_new_tokens=4), max_tokens_per_micro_batch=15)
