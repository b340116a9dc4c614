"""Packed micro-batches equal the padded path: log-probs, entropy, values, RM scores, losses, gradients
(tiny Llama, Qwen2, GPT-2 with absolute positions; left and right padding; garbage in the padding)."""
from __future__ import annotations

import copy
import random

import pytest
import torch
import transformers

from fastrlhf.models import PolicyWithLoss, RewardModel, ValueModel, tiny_gpt2, tiny_llama
from fastrlhf.models.heads import position_ids_from_mask
from fastrlhf.models.packing import (
    balanced_micro_batches,
    block_causal_mask,
    body_inputs,
    head_outputs_packed,
    last_token_outputs_packed,
    pack_rows,
    policy_forward_packed,
    uses_varlen,
)

V = 67


def _qwen2(vocab, seed=0, **_):
    cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(cfg).float().eval()


ARCHS = {"llama": tiny_llama, "qwen2": _qwen2, "gpt2": tiny_gpt2}
PROMPTS = [5, 2, 7, 3, 1]
RESPONSES = [4, 9, 1, 6, 0]  # a row with an empty response too


def _ppo_batch(prompt_side="left", seed=0):
    """``[B, P + R]``: prompts padded on ``prompt_side`` to P, responses right-padded to R; garbage ids
    (not the pad id) in every padding slot."""
    g = torch.Generator().manual_seed(seed)
    p, r = max(PROMPTS), max(RESPONSES)
    ids = torch.randint(3, V, (len(PROMPTS), p + r), generator=g)
    attn = torch.zeros_like(ids)
    for i, (np_, nr) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        if prompt_side == "left":  # the PPO layout: prompt left-padded, response right-padded
            attn[i, p - np_:p + nr] = 1
        elif prompt_side == "right":  # right padding only
            attn[i, :np_ + nr] = 1
        else:  # left padding only
            attn[i, p + r - np_ - nr:] = 1
    return ids, attn, p


# ------------------------------------------------------------------------------------------ bin-packing
def test_balanced_micro_batches_respect_the_budget_and_balance():
    rnd = random.Random(0)
    lengths = [rnd.randint(8, 256) for _ in range(64)]
    bins = balanced_micro_batches(lengths, 1024)
    assert sorted(i for b in bins for i in b) == list(range(64))
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert max(loads) <= 1024
    assert len(bins) <= -(-sum(lengths) // 1024) + 1  # near the lower bound
    assert max(loads) - min(loads) <= max(lengths)  # balanced, not first-fit's full bins + a tail
    assert all(b == sorted(b) for b in bins)


def test_balanced_micro_batches_min_bins_and_errors():
    bins = balanced_micro_batches([3, 3, 3], 100, min_bins=5)
    assert len(bins) == 5 and sorted(i for b in bins for i in b) == [0, 1, 2]
    assert sum(1 for b in bins if not b) == 2
    with pytest.raises(ValueError, match="row 1 has 9 tokens.*at least 9"):
        balanced_micro_batches([2, 9], 8)
    # LPT needing one more bin than first-fit-decreasing still returns a valid packing
    lengths = [5, 5, 4, 3, 3]
    bins = balanced_micro_batches(lengths, 10)
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)


# --------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("capacity", [None, 12, 20])
def test_pack_rows_round_trip_and_positions(capacity):
    ids, attn, _ = _ppo_batch("left")
    packed = pack_rows(ids, attn, row_capacity=capacity, pad_id=0)
    if capacity is not None:
        assert packed.input_ids.shape[1] <= capacity
    assert int((packed.segment_ids >= 0).sum()) == int(attn.sum())
    back = packed.unpack(packed.input_ids[..., None], fill=-1)[..., 0]
    assert torch.equal(back, torch.where(attn.bool(), ids, torch.full_like(ids, -1)))
    pos = packed.unpack(packed.position_ids)
    assert torch.equal(pos, torch.where(attn.bool(), position_ids_from_mask(attn), torch.zeros_like(pos)))
    last = packed.last_token(packed.input_ids)
    for i in range(ids.shape[0]):
        assert last[i] == ids[i][attn[i].bool()][-1]


def test_pack_rows_rejects_holes_and_block_mask_shapes():
    ids = torch.arange(6).view(1, 6)
    with pytest.raises(ValueError, match="contiguous"):
        pack_rows(ids, torch.tensor([[1, 0, 1, 1, 0, 0]]))
    seg = torch.tensor([[0, 0, 1, 1, -1]])
    m = block_causal_mask(seg, "sdpa", torch.float32)[0, 0]
    assert m.tolist()[3] == [False, False, True, True, False]
    assert m[4].tolist() == [False, False, False, False, True]  # padding attends to itself only
    e = block_causal_mask(seg, "eager", torch.float32)[0, 0]
    assert (e == 0).equal(m)
    with pytest.raises(ValueError, match="packing=false"):
        block_causal_mask(seg, "paged_attention", torch.float32)


def test_varlen_attention_gets_one_row_and_no_mask():
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=2, num_hidden_layers=1)
    cfg._attn_implementation = "flash_attention_2"
    assert uses_varlen(cfg)
    ids, attn, _ = _ppo_batch()
    one = pack_rows(ids, attn, row_capacity=None)
    kw = body_inputs(one, cfg)
    assert kw["attention_mask"] is None and one.input_ids.shape[0] == 1
    with pytest.raises(ValueError, match="one row"):
        body_inputs(pack_rows(ids, attn, row_capacity=12), cfg)


# ---------------------------------------------------------------------------------- packed == padded
def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ARCHS)
def test_policy_logprobs_entropy_values_equal_padded(arch):
    lm = ARCHS[arch](V, seed=1)
    policy = PolicyWithLoss(lm, shared_critic=True, backend="torch")
    torch.nn.init.normal_(policy.value_head.weight, std=0.1)
    ids, attn, p = _ppo_batch("left")  # prompts left-padded to P, responses right-padded
    with torch.no_grad():
        lp, ent, val = policy(ids, attn, mode="logprobs", prompt_len=p)
        plp, pent, pval = policy_forward_packed(policy, ids, attn, mode="logprobs", prompt_len=p)
    m = attn[:, p:].bool()
    for a, b in ((lp, plp), (ent, pent), (val, pval)):
        torch.testing.assert_close(torch.where(m, b, 0.0), torch.where(m, a, 0.0), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_policy_loss_and_gradients_equal_padded(arch, loss_agg):
    lm = ARCHS[arch](V, seed=2)
    padded_policy = PolicyWithLoss(lm, shared_critic=True, backend="torch")
    torch.nn.init.normal_(padded_policy.value_head.weight, std=0.1)
    packed_policy = copy.deepcopy(padded_policy)
    ids, attn, p = _ppo_batch("left", seed=3)
    g = torch.Generator().manual_seed(4)
    mask = attn[:, p:].bool()
    shape = mask.shape
    kwargs = dict(old_logprobs=-torch.rand(shape, generator=g) * 3, advantages=torch.randn(shape, generator=g),
                  mask=mask, ref_logprobs=-torch.rand(shape, generator=g) * 3, kl_coef=0.1, kl_kind="k3",
                  entropy_coef=0.01, clip_low=0.2, loss_agg=loss_agg)
    kwargs["old_logprobs"][~mask] = float("nan")  # garbage in padding must not leak
    loss, stats, values = padded_policy(ids, attn, mode="loss", prompt_len=p, **kwargs)
    ploss, pstats, pvalues = policy_forward_packed(packed_policy, ids, attn, mode="loss", prompt_len=p, **kwargs)
    torch.testing.assert_close(ploss, loss, atol=1e-5, rtol=1e-5)
    for k in stats:
        torch.testing.assert_close(pstats[k], stats[k], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.where(mask, pvalues, 0.0), torch.where(mask, values, 0.0), atol=1e-5,
                               rtol=1e-5)
    w = torch.randn(shape, generator=g)
    (loss + (torch.where(mask, values, 0.0) * w).sum()).backward()
    (ploss + (torch.where(mask, pvalues, 0.0) * w).sum()).backward()
    ga, gb = _grads(padded_policy), _grads(packed_policy)
    assert ga.keys() == gb.keys() and len(ga) > 5
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["left", "right", "left_only"])
def test_reward_and_value_models_equal_padded(arch, side):
    rm = RewardModel(ARCHS[arch](V, seed=5))
    critic = ValueModel(ARCHS[arch](V, seed=6), head_init_std=0.1)
    ids, attn, _ = _ppo_batch(side, seed=7)
    scores = rm(ids, attn)
    pscores = last_token_outputs_packed(rm, ids, attn)[:, 0]
    torch.testing.assert_close(pscores, scores, atol=2e-5, rtol=1e-5)
    has = attn.bool()
    vals = critic(ids, attn)
    pvals = head_outputs_packed(critic, ids, attn)[..., 0]
    torch.testing.assert_close(pvals, torch.where(has, vals, 0.0), atol=2e-5, rtol=1e-5)
    # gradients of a Bradley-Terry-like loss through the packed path
    rm2 = copy.deepcopy(rm)
    w = torch.linspace(-1, 1, ids.shape[0])
    (scores * w).sum().backward()
    (last_token_outputs_packed(rm2, ids, attn)[:, 0] * w).sum().backward()
    ga, gb = _grads(rm), _grads(rm2)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=2e-5, rtol=1e-4, msg=name)


def test_eager_attention_packs_too():
    lm = tiny_llama(V, seed=8, attn_implementation="eager")
    assert lm.config._attn_implementation == "eager"
    policy = PolicyWithLoss(lm, backend="torch")
    ids, attn, p = _ppo_batch("left", seed=9)
    with torch.no_grad():
        lp, ent, _ = policy(ids, attn, mode="logprobs", prompt_len=p)
        plp, pent, _ = policy_forward_packed(policy, ids, attn, mode="logprobs", prompt_len=p)
    m = attn[:, p:].bool()
    torch.testing.assert_close(torch.where(m, plp, 0.0), torch.where(m, lp, 0.0), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batch_with_no_valid_response_token(loss_agg):
    """Every response masked out (rows dropped upstream): zero loss and zero stats, as the padded path."""
    policy = PolicyWithLoss(tiny_llama(V, seed=10), shared_critic=True, backend="torch")
    ids, attn, p = _ppo_batch("left", seed=11)
    mask = torch.zeros_like(attn[:, p:], dtype=torch.bool)
    kw = dict(old_logprobs=torch.zeros(mask.shape), advantages=torch.ones(mask.shape), mask=mask, loss_agg=loss_agg)
    loss, stats, _ = policy(ids, attn, mode="loss", prompt_len=p, **kw)
    ploss, pstats, pvalues = policy_forward_packed(policy, ids, attn, mode="loss", prompt_len=p, **kw)
    assert float(ploss) == float(loss) == 0.0
    assert all(float(pstats[k]) == float(stats[k]) for k in stats)
    (ploss + pvalues.sum()).backward()  # no error on an empty selection


def test_sequence_level_policy_loss_gspo_equals_padded():
    """GSPO's ratio is per sequence: the packed path keeps rows for it and matches the padded loss."""
    policy = PolicyWithLoss(tiny_llama(V, seed=12), backend="torch")
    twin = copy.deepcopy(policy)
    ids, attn, p = _ppo_batch("left", seed=13)
    mask = attn[:, p:].bool()
    g = torch.Generator().manual_seed(14)
    kw = dict(old_logprobs=-torch.rand(mask.shape, generator=g) * 3, advantages=torch.randn(mask.shape, generator=g),
              mask=mask, policy_loss="gspo", loss_agg="seq-mean-token-mean")
    loss, stats, _ = policy(ids, attn, mode="loss", prompt_len=p, **kw)
    ploss, pstats, _ = policy_forward_packed(twin, ids, attn, mode="loss", prompt_len=p, **kw)
    torch.testing.assert_close(ploss, loss, atol=1e-5, rtol=1e-5)
    loss.backward()
    ploss.backward()
    for (name, a), b in zip(policy.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=2e-5, rtol=1e-4, msg=name)
