"""HFRollout: KV-cached sampling with left padding, lockstep step count, EOS cut, seeded determinism."""

from __future__ import annotations

import copy

import pytest
import torch

from fastrlhf.data import build_test_tokenizer
from fastrlhf.models import tiny_llama
from fastrlhf.models.policy import PolicyWithLoss
from fastrlhf.rollout.base import RolloutEngine, SamplingParams
from fastrlhf.rollout.hf import HFRollout, filter_logits
from fastrlhf.trainers.ppo_batch import build_batch


@pytest.fixture(scope="module")
def tok():
    return build_test_tokenizer()


@pytest.fixture(scope="module")
def lm(tok):
    return tiny_llama(len(tok), seed=3, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)


PROMPTS = [[10, 11, 12, 13, 14, 15, 16], [20, 21], [30, 31, 32, 33]]  # ragged: left padding matters


def test_is_a_rollout_engine(lm, tok):
    engine = HFRollout(lm, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert isinstance(engine, RolloutEngine) and engine.shares_actor_weights


def test_greedy_matches_hf_generate_per_prompt(lm, tok):
    """Batched, left-padded, cached decoding gives each prompt what unpadded HF generate gives it."""
    engine = HFRollout(lm, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    gen = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, temperature=0))
    for prompt, got in zip(PROMPTS, gen.token_ids, strict=True):
        ids = torch.tensor([prompt])
        ref = lm.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[0, len(prompt) :].tolist()
        assert got == ref[: len(got)] and (len(got) == 6 or got[-1] == tok.eos_token_id)


def test_sampler_logprobs_match_trainer_recompute(lm, tok):
    """Without truncation the sampler's log-probs (KV cache, left padding) equal the trainer's
    teacher-forced ones."""
    engine = HFRollout(lm, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    params = SamplingParams(max_new_tokens=7, temperature=0.7, seed=5)
    gen = engine.generate(PROMPTS, params)
    batch = build_batch(PROMPTS, gen, pad_token_id=tok.pad_token_id, device=torch.device("cpu"))
    policy = PolicyWithLoss(lm, temperature=0.7, backend="torch")
    with torch.no_grad():
        lp, _, _ = policy(batch.input_ids, batch.attention_mask, mode="logprobs", prompt_len=batch.prompt_len)
    torch.testing.assert_close(lp[batch.mask], batch.sampler_logprobs[batch.mask], atol=1e-5, rtol=1e-5)


def test_truncated_sampling_reports_logprobs_of_the_truncated_distribution(lm, tok):
    """top-k / top-p: the reported log-prob is that of the renormalised top-k/top-p distribution the
    token was drawn from (vLLM's processed_logprobs), recomputed here from teacher-forced logits; it is
    above the full-distribution log-prob the trainer computes (the kept mass is < 1)."""
    engine = HFRollout(lm, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    params = SamplingParams(max_new_tokens=7, temperature=0.7, top_k=20, top_p=0.9, seed=5)
    gen = engine.generate(PROMPTS, params)
    batch = build_batch(PROMPTS, gen, pad_token_id=tok.pad_token_id, device=torch.device("cpu"))
    p = batch.prompt_len
    with torch.no_grad():
        pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits
    logits = logits[:, p - 1 : -1].float() / 0.7
    b, r, v = logits.shape
    trunc = filter_logits(logits.reshape(-1, v), top_k=20, top_p=0.9).reshape(b, r, v).log_softmax(-1)
    ref = trunc.gather(-1, batch.responses[..., None])[..., 0]
    torch.testing.assert_close(batch.sampler_logprobs[batch.mask], ref[batch.mask], atol=1e-5, rtol=1e-5)
    full = logits.log_softmax(-1).gather(-1, batch.responses[..., None])[..., 0]
    assert (batch.sampler_logprobs[batch.mask] >= full[batch.mask] - 1e-6).all()
    assert (batch.sampler_logprobs[batch.mask] > full[batch.mask] + 1e-4).any()


def test_always_max_new_tokens_forward_steps_and_eos_cut(lm, tok):
    """Even when every row stops at once, the loop takes max_new_tokens forwards (FSDP lockstep)."""
    lm = copy.deepcopy(lm)
    calls = []

    def eos_always(module, args, kwargs, out):  # count the forward and make EOS the argmax
        calls.append(1)
        out.logits[..., tok.eos_token_id] = 1e4
        return out

    lm.register_forward_hook(eos_always, with_kwargs=True)
    engine = HFRollout(lm, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    gen = engine.generate(PROMPTS, SamplingParams(max_new_tokens=5, temperature=0))
    assert len(calls) == 5
    assert gen.token_ids == [[tok.eos_token_id]] * 3 and all(len(lp) == 1 for lp in gen.logprobs)


def test_cut_after_first_eos_keeps_it():
    engine = HFRollout(torch.nn.Linear(1, 1), pad_token_id=0, eos_token_id=[1, 2])
    tokens = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [2, 5, 5, 5]])
    gen = engine._cut(tokens, torch.arange(12.0).view(3, 4))
    assert gen.token_ids == [[5, 1], [5, 6, 7, 8], [2]]
    assert gen.logprobs == [[0.0, 1.0], [4.0, 5.0, 6.0, 7.0], [8.0]]


def test_seeded_sampling_is_reproducible(lm, tok):
    engine = HFRollout(lm, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    a = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, seed=11))
    b = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, seed=11))
    c = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, seed=12))
    assert a == b and a.token_ids != c.token_ids


def test_filter_logits_top_k_and_top_p_hand_case():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_k=2)[0, :2]).all()
    # top_p=0.8: 0.5 + 0.3 reaches 0.8, so the 0.15 and 0.05 tokens go; 0.5 alone does not reach it
    kept = torch.isfinite(filter_logits(logits, top_p=0.8))[0].tolist()
    assert kept == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.01))[0].tolist() == [True, False, False, False]


def test_bad_arguments(lm, tok):
    engine = HFRollout(lm, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=0))
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[1], []], SamplingParams(max_new_tokens=2))


def test_n_samples_per_prompt_adjacent_distinct_reproducible(lm, tok):
    """n = 4: four samples per prompt, rows of a prompt adjacent (each row's log-probs recompute with
    its own prompt), distinct, reproducible for a seed (one generator for the batch)."""
    engine = HFRollout(lm, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=21, n=4)
    a = engine.generate(PROMPTS, params)
    assert a == engine.generate(PROMPTS, params)
    assert a.token_ids != engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, seed=22, n=4)).token_ids
    assert len(a.token_ids) == 4 * len(PROMPTS)
    for i in range(len(PROMPTS)):
        assert len({tuple(t) for t in a.token_ids[4 * i: 4 * i + 4]}) == 4
    batch = build_batch(PROMPTS, a, pad_token_id=tok.pad_token_id, device=torch.device("cpu"))
    assert batch.group.tolist() == [g for g in range(len(PROMPTS)) for _ in range(4)]
    with torch.no_grad():
        lp, _, _ = PolicyWithLoss(lm, backend="torch")(batch.input_ids, batch.attention_mask, mode="logprobs",
                                                       prompt_len=batch.prompt_len)
    torch.testing.assert_close(lp[batch.mask], batch.sampler_logprobs[batch.mask], atol=1e-5, rtol=1e-5)
