"""PPO score + train step, packed vs padded micro-batches, on CPU (issue 11's measurement).

A ~10M-parameter Llama-shaped actor, critic, reference and reward model; 32 rows with prompts of 16..48
tokens (left-padded) and responses uniform over 8..256 tokens (right-padded): about half of the padded
batch is padding. Padded: micro-batches of 8 rows at the batch's full width. Packed: balanced micro-batches
of at most 8 x (48 + 256) tokens (the padded micro-batch's size), valid tokens only. Same process,
alternated runs; tokens/s counts valid tokens.

    python bench/packing_throughput.py --repeats 3
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from fastrlhf.kernels import ppo_value_loss
from fastrlhf.models import PolicyWithLoss, RewardModel, ValueModel, tiny_llama
from fastrlhf.models.packing import (balanced_micro_batches, head_outputs_packed, last_token_outputs_packed,
                                     policy_forward_packed)

V, B, P, R, MICRO = 8000, 32, 48, 256, 8


def build():
    lm = tiny_llama(V, hidden_size=256, num_layers=6, num_heads=8, intermediate_size=688,
                    max_position_embeddings=512, seed=0)
    actor = PolicyWithLoss(lm, backend="torch")
    ref = PolicyWithLoss(copy.deepcopy(lm), backend="torch").requires_grad_(False).eval()
    critic = ValueModel(copy.deepcopy(lm), head_init_std=0.02)
    reward = RewardModel(copy.deepcopy(lm)).requires_grad_(False).eval()
    return actor, ref, critic, reward


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, P + R), generator=g)
    attn = torch.zeros_like(ids)
    for i in range(B):
        np_ = int(torch.randint(16, P + 1, (1,), generator=g))
        nr = int(torch.randint(8, R + 1, (1,), generator=g))
        attn[i, P - np_:P + nr] = 1
    return ids, attn


def step(models, ids, attn, packed: bool) -> None:
    actor, ref, critic, reward = models
    if packed:
        groups = balanced_micro_batches(attn.sum(-1).tolist(), MICRO * (P + R))
        parts = [torch.tensor(g) for g in groups if g]
    else:
        parts = list(torch.split(torch.arange(B), MICRO))
    mask_all = attn[:, P:].bool()
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(mask_all.shape, generator=g)
    total = mask_all.sum()
    with torch.no_grad():  # SCORE
        for rows in parts:
            i, a = ids[rows], attn[rows]
            if packed:
                policy_forward_packed(actor, i, a, mode="logprobs", prompt_len=P)
                policy_forward_packed(ref, i, a, mode="logprobs", prompt_len=P)
                head_outputs_packed(critic, i, a)
                last_token_outputs_packed(reward, i, a)
            else:
                actor(i, a, mode="logprobs", prompt_len=P)
                ref(i, a, mode="logprobs", prompt_len=P)
                critic(i, a)
                reward(i, a)
    for rows in parts:  # TRAIN: one epoch, one minibatch
        i, a, m = ids[rows], attn[rows], mask_all[rows]
        kw = dict(old_logprobs=torch.full(m.shape, -3.0), advantages=adv[rows], mask=m, loss_agg="token-mean")
        w = m.sum() / total
        if packed:
            loss, _, _ = policy_forward_packed(actor, i, a, mode="loss", prompt_len=P, **kw)
            values = head_outputs_packed(critic, i, a)[..., 0][:, P - 1:-1]
        else:
            loss, _, _ = actor(i, a, mode="loss", prompt_len=P, **kw)
            values = critic(i, a)[:, P - 1:-1]
        vloss, _ = ppo_value_loss(values, adv[rows], adv[rows], m, clip=0.2)
        (w * (loss + vloss)).backward()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    models = build()
    ids, attn = batch()
    valid = int(attn.sum())
    print(f"actor params {sum(p.numel() for p in models[0].parameters()) / 1e6:.1f} M; {B} rows, "
          f"{valid} valid of {B * (P + R)} tokens ({1 - valid / (B * (P + R)):.0%} padding)")
    times = {"padded": [], "packed": []}
    step(models, ids, attn, False)  # warm-up both paths
    step(models, ids, attn, True)
    for _ in range(args.repeats):
        for mode in ("padded", "packed"):
            t0 = time.perf_counter()
            step(models, ids, attn, mode == "packed")
            times[mode].append(time.perf_counter() - t0)
    for mode, ts in times.items():
        print(f"{mode}: median {statistics.median(ts):.2f} s (runs {', '.join(f'{t:.2f}' for t in ts)}), "
              f"{valid / statistics.median(ts):.0f} valid tokens/s")
    speedup = statistics.median(times["padded"]) / statistics.median(times["packed"])
    print(f"packed / padded tokens/s: {speedup:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
