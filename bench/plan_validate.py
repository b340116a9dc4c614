"""Predicted (``fastrlhf.engine.planner``) vs measured peak memory per PPO phase, on CPU.

Measured: the peak of live tensor bytes in each phase, from ``torch.distributed._tools.mem_tracker.MemTracker``
(it tracks every tensor storage that is allocated and freed while it is active, plus the parameters,
gradients and optimizer state registered with ``track_external``): the CPU counterpart of
``torch.cuda.max_memory_allocated``. Predicted: ``plan_ppo`` for the same architecture and token budget
(fp32, nothing offloaded: a CPU run). Four Llama-shaped models (actor, reference, critic, reward model;
the critic and reward model are value/score heads on the body), one rank or FSDP2 over two gloo ranks,
with and without gradient checkpointing.

    python bench/plan_validate.py --sizes S,M,L --out bench/results/plan_validate_1rank.json
    torchrun --nproc_per_node 2 bench/plan_validate.py --sizes S,M,L --out bench/results/plan_validate_2rank.json
    python bench/plan_validate.py --table bench/results/plan_validate_1rank.json bench/results/plan_validate_2rank.json

GENERATE is the HF backend (the actor generates with a KV cache); SYNC needs a vLLM engine and is not
measured on CPU (the HF backend has no SYNC).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

SIZES = {  # name: (hidden, layers, heads, intermediate); vocab 8000, head_dim 64 (32 for S)
    "S": (256, 6, 8, 688),
    "M": (512, 8, 8, 1376),
    "L": (768, 12, 12, 2048),
}
VOCAB, PROMPT, RESPONSE, MICRO, ROLLOUT = 8000, 32, 96, 4, 8


def _models(size: str):
    from fastrlhf.models import PolicyWithLoss, RewardModel, ValueModel, tiny_llama

    h, layers, heads, inter = SIZES[size]
    lm = tiny_llama(VOCAB, hidden_size=h, num_layers=layers, num_heads=heads, intermediate_size=inter,
                    max_position_embeddings=256, seed=0)
    actor = PolicyWithLoss(lm, backend="torch")
    ref = PolicyWithLoss(copy.deepcopy(lm), backend="torch").requires_grad_(False).eval()
    critic = ValueModel(copy.deepcopy(lm), head_init_std=0.02)
    reward = RewardModel(copy.deepcopy(lm)).requires_grad_(False).eval()
    return actor, ref, critic, reward, lm.config


def _batch(rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, PROMPT + RESPONSE), generator=g)
    attn = torch.ones_like(ids)
    return ids, attn


class Tracker:
    """One MemTracker per phase (it refuses re-entry without a reset)."""

    def __init__(self, *modules_and_optims):
        from torch.distributed._tools.mem_tracker import MemTracker

        class TotalsOnly(MemTracker):
            """Only the device totals: the per-module bookkeeping refuses modules called repeatedly
            (generate, the critic after the actor), and the totals do not need it."""

            def _pre_fw_hook(self, module, inputs):
                pass

            def _post_fw_hook(self, module, inputs, outputs):
                pass

            def _pre_bw_hook(self, module, args):
                pass

            def _post_bw_hook(self, module, args):
                pass

        self.mt = TotalsOnly()
        self.mt.track_external(*modules_and_optims)

    def __enter__(self):
        self.mt.reset_mod_stats()
        self.mt.__enter__()
        snap = self.mt.get_tracker_snapshot()
        self.base = int(sum(v["Total"] for v in snap.values()))  # live state when the phase starts
        return self

    def __exit__(self, *exc):
        self.mt.__exit__(*exc)

    def peak(self) -> int:
        snap = self.mt.get_tracker_snapshot("peak")
        return int(sum(v["Total"] for v in snap.values()))  # noqa: the key is _TOTAL_KEY == "Total"


def _loss_kwargs(mask):
    g = torch.Generator().manual_seed(1)
    return dict(old_logprobs=-torch.rand(mask.shape, generator=g) * 5, advantages=torch.randn(mask.shape, generator=g),
                mask=mask, clip_low=0.2, loss_agg="token-mean")


def _train_step(actor, critic, opts, ids, attn, micro_batches: int = 2):
    """One optimizer step over ``micro_batches`` micro-batches (gradient accumulation, as the trainer runs
    a minibatch: from the second micro-batch on, its activations coexist with both models' gradients);
    gradients are released first, as the trainer does before each minibatch."""
    from fastrlhf.kernels import ppo_value_loss

    for opt in opts:
        opt.zero_grad(set_to_none=True)
    mask = attn[:, PROMPT:].bool()
    kw = _loss_kwargs(mask)
    for _ in range(micro_batches):
        loss, _, _ = actor(ids, attn, mode="loss", prompt_len=PROMPT, **kw)
        loss.backward()
        values = critic(ids, attn)[:, PROMPT - 1:-1]
        vloss, _ = ppo_value_loss(values, kw["advantages"], kw["advantages"], mask, clip=0.2)
        vloss.backward()
    for opt in opts:
        opt.step()


def measure(size: str, ckpt: bool, world: int) -> dict:
    from fastrlhf.trainers.common import build_optimizer

    actor, ref, critic, reward, config = _models(size)
    if ckpt:
        actor.lm.gradient_checkpointing_enable()
        critic.gradient_checkpointing_enable()
    if world > 1:
        from fastrlhf.engine.fsdp import shard_model

        dev = torch.device("cpu")
        for m, train in ((actor, True), (critic, True), (ref, False), (reward, False)):
            shard_model(m, device=dev, train=train)
    actor.train()
    critic.train()
    opts = [build_optimizer(actor, lr=1e-6), build_optimizer(critic, lr=1e-6)]
    # warm-up: Adam state exists from the first step on (steady state), on a one-row batch
    ids, attn = _batch(1, 99)
    _train_step(actor, critic, opts, ids, attn, micro_batches=1)
    for o in opts:
        o.zero_grad(set_to_none=True)  # the trainer frees grads after each iteration's last step
    rank = int(os.environ.get("RANK", 0))
    out = {"size": size, "ckpt": ckpt, "world": world, "params_actor": sum(p.numel() for p in actor.parameters())}
    track = Tracker(actor, ref, critic, reward, *opts)
    # GENERATE (HF backend): the actor samples ROLLOUT rows of RESPONSE tokens with a KV cache
    prompts, pattn = _batch(ROLLOUT, rank)
    from fastrlhf.rollout.base import SamplingParams
    from fastrlhf.rollout.hf import HFRollout

    rollout = HFRollout(actor, pad_token_id=0, eos_token_id=1)  # the trainer's HF backend (FSDP-safe)
    prompts = [row.tolist() for row in _batch(ROLLOUT, rank)[0][:, :PROMPT]]
    with track:
        rollout.generate(prompts, SamplingParams(max_new_tokens=RESPONSE, seed=rank))
    out["generate"], out["base_generate"] = track.peak(), track.base
    ids, attn = _batch(MICRO, 10 + rank)
    with track, torch.no_grad():  # SCORE: model by model over the micro-batch
        actor(ids, attn, mode="logprobs", prompt_len=PROMPT)
        ref(ids, attn, mode="logprobs", prompt_len=PROMPT)
        reward(ids, attn)
        critic(ids, attn)
    out["score"], out["base_score"] = track.peak(), track.base
    actor.train()
    t0 = time.perf_counter()
    with track:
        _train_step(actor, critic, opts, ids, attn)
    out["train"], out["base_train"] = track.peak(), track.base
    out["train_seconds"] = time.perf_counter() - t0
    out.update(predict(config, ckpt, world))
    return out


def predict(config, ckpt: bool, world: int) -> dict:
    from fastrlhf.engine.planner import PlanSpec, arch_from_config, plan_ppo

    arch = arch_from_config(config)
    spec = PlanSpec(actor=arch, gpus=world, gpu_bytes=None, precision="fp32", gradient_checkpointing=ckpt,
                    offload="none", packing=False, micro_batch_size=MICRO, rollout_batch_size=ROLLOUT,
                    prompt_len=PROMPT, response_len=RESPONSE, vllm=False)
    plan = plan_ppo(spec)
    out = {f"pred_{p}": plan.phases[p].total for p in ("generate", "score", "train")}
    for p in ("generate", "score", "train"):  # what comes on top of params / Adam state (grads: TRAIN only)
        out[f"pred_dyn_{p}"] = plan.phases[p].total - sum(
            v for k, v in plan.phases[p].items.items() if k.endswith((".params", ".optim", ".root_gathered")))
    return out


def table(paths: list[str]) -> str:
    rows = [r for p in paths for r in json.load(open(p))]
    lines = ["| model | actor params | ranks | ckpt | phase | predicted MB | measured MB | error | "
             "above state: predicted / measured MB |", "|---|---|---|---|---|---|---|---|---|"]
    worst = worst_dyn = 0.0
    for r in rows:
        for phase in ("generate", "score", "train"):
            pred, meas = r[f"pred_{phase}"], r[phase]
            err = pred / meas - 1
            dyn_pred, dyn_meas = r[f"pred_dyn_{phase}"], r[phase] - r[f"base_{phase}"]
            worst = max(worst, abs(err))
            worst_dyn = max(worst_dyn, abs(dyn_pred / max(dyn_meas, 1) - 1))
            lines.append(f"| {r['size']} | {r['params_actor'] / 1e6:.1f} M | {r['world']} | "
                         f"{'on' if r['ckpt'] else 'off'} | {phase.upper()} | {pred / 2**20:.0f} | "
                         f"{meas / 2**20:.0f} | {err:+.1%} | {dyn_pred / 2**20:.0f} / {dyn_meas / 2**20:.0f} |")
    lines.append(f"\nlargest |error| of the peak: {worst:.1%}; of the part above the state: {worst_dyn:.1%}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="S,M,L")
    ap.add_argument("--out", default=None)
    ap.add_argument("--table", nargs="*", default=None)
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return 0
    world = int(os.environ.get("WORLD_SIZE", 1))
    torch.set_num_threads(1)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    results = []
    for size in args.sizes.split(","):
        for ckpt in (False, True):
            r = measure(size, ckpt, world)
            results.append(r)
            if int(os.environ.get("RANK", 0)) == 0:
                print(json.dumps({k: (round(v / 2**20, 1) if type(v) is int and k != "world" else v)
                                  for k, v in r.items()}), flush=True)
    if args.out and int(os.environ.get("RANK", 0)) == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
