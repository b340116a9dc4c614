"""TIS weights and how they reach the policy loss; the missing-EOS penalty; truncation flags."""
from __future__ import annotations

import math

import pytest
import torch

from fastrlhf.kernels import fused_ppo_loss_from_logits
from fastrlhf.rollout.base import Generation
from fastrlhf.rollout.correction import apply_tis, missing_eos_penalty, tis_weights
from fastrlhf.trainers.ppo_batch import build_batch


def test_tis_weights_hand_case():
    old = torch.tensor([[-1.0, -2.0, -0.5, 7.0]])
    sampler = torch.tensor([[-1.2, -0.5, -0.5, float("nan")]])  # last column is padding (garbage)
    mask = torch.tensor([[True, True, True, False]])
    w, stats = tis_weights(old, sampler, mask, cap=1.1)
    # exp(0.2) = 1.2214 -> capped at 1.1; exp(-1.5) = 0.2231; exp(0) = 1; padding 1
    torch.testing.assert_close(w, torch.tensor([[1.1, math.exp(-1.5), 1.0, 1.0]]))
    assert stats["tis_capped_fraction"].item() == pytest.approx(1 / 3)
    assert stats["tis_weight_mean"].item() == pytest.approx((1.1 + math.exp(-1.5) + 1.0) / 3)
    assert stats["tis_ratio_max"].item() == pytest.approx(math.exp(0.2))


def _hand_ppo_loss(lp, old, adv, mask, w, clip):
    """Reference: token-mean over valid tokens of w_t * max(-A r, -A clip(r, 1-eps, 1+eps))."""
    r = torch.exp(lp - old)
    per_tok = torch.maximum(-adv * r, -adv * r.clamp(1 - clip, 1 + clip))
    return (w * per_tok)[mask].sum() / mask.sum()


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_tis_folded_into_advantages_is_loss_times_weight(dual_clip, seeded):
    """The kernel gets advantages * w and returns exactly sum_t w_t * l_t / n: checked against the
    per-token formula written out, with ratios far enough from 1 that clipping (and dual clipping)
    is active on some tokens, and with some weights capped."""
    b, t, v = 3, 5, 11
    logits = torch.randn(b, t, v, generator=seeded) * 2
    labels = torch.randint(0, v, (b, t), generator=seeded)
    mask = torch.rand(b, t, generator=seeded) > 0.2
    lp = logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    old = lp + 0.6 * torch.randn(b, t, generator=seeded)  # ratios exp(lp - old) spread around 1
    sampler = old + 0.8 * torch.randn(b, t, generator=seeded)  # a perturbed sampler
    adv = torch.randn(b, t, generator=seeded)
    w, stats = tis_weights(old, sampler, mask, cap=1.5)
    assert 0 < stats["tis_capped_fraction"].item() < 1
    loss, st = fused_ppo_loss_from_logits(logits, labels, old, apply_tis(adv, w), mask, clip_low=0.2,
                                          dual_clip=dual_clip, backend="torch")
    ref = _hand_ppo_loss(lp, old, adv, mask, w, 0.2) if dual_clip is None else None
    if dual_clip is not None:
        r = torch.exp(lp - old)
        per_tok = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.2))
        per_tok = torch.where(adv < 0, torch.minimum(per_tok, -adv * dual_clip), per_tok)
        ref = (w * per_tok)[mask].sum() / mask.sum()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    _, unweighted = fused_ppo_loss_from_logits(logits, labels, old, adv, mask, clip_low=0.2,
                                               dual_clip=dual_clip, backend="torch")
    assert st["clipfrac"].item() == pytest.approx(unweighted["clipfrac"].item())  # clipping unchanged


def test_missing_eos_penalty_exactly_on_truncated_rows():
    eos = 2
    prompts = [[5, 6], [7], [8, 9, 10]]
    # row 2 hit max_new_tokens=3 without EOS; row 3 stopped at once with EOS
    gen = Generation(token_ids=[[11, 12, eos], [13, 14, 15], [eos]], logprobs=[[-1.0] * 3, [-1.0] * 3, [-1.0]])
    batch = build_batch(prompts, gen, pad_token_id=0, device=torch.device("cpu"), eos_token_ids=[eos, 99])
    assert batch.truncated.tolist() == [False, True, False]
    scores = torch.tensor([1.0, 2.0, -0.5])
    assert missing_eos_penalty(scores, batch.truncated, 0.75).tolist() == [1.0, 1.25, -0.5]


def test_build_batch_groups_n_responses_per_prompt():
    prompts = [[5, 6], [7]]
    resp = [[11], [12, 2], [13, 14], [2], [15], [16, 17]]  # n = 3
    batch = build_batch(prompts, Generation(resp, [[-1.0] * len(r) for r in resp]), pad_token_id=0,
                        device=torch.device("cpu"), eos_token_ids=[2])
    assert batch.group.tolist() == [0, 0, 0, 1, 1, 1] and batch.group.dtype == torch.int64
    assert batch.truncated.tolist() == [True, False, True, False, True, True]
    prompt_part = batch.input_ids[:, : batch.prompt_len]
    assert prompt_part[:3].tolist() == [[5, 6]] * 3 and prompt_part[3:, -1].tolist() == [7] * 3
    assert batch.select(torch.tensor([4, 1])).group.tolist() == [1, 0]
    with pytest.raises(ValueError, match="2 prompts but 5 responses"):
        build_batch(prompts, Generation(resp[:5], [[-1.0]] * 5), pad_token_id=0, device=torch.device("cpu"))
