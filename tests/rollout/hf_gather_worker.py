"""Worker for tests/rollout/test_hf_fsdp.py: ``torchrun --nproc_per_node 2 hf_gather_worker.py OUT.json``.

Each rank shards a tiny actor with FSDP2 (gloo), generates with HFRollout (n=2, 6 new tokens) and
counts FSDP2's all-gathers; then generates the same with an unsharded copy and compares. Rank 0 writes
the results of both ranks.
"""
from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from fastrlhf.engine.fsdp import shard_model
from fastrlhf.engine.runtime import init_runtime
from fastrlhf.models import tiny_llama
from fastrlhf.models.policy import PolicyWithLoss
from fastrlhf.rollout.base import SamplingParams
from fastrlhf.rollout.hf import HFRollout

VOCAB, EOS, PAD = 101, 1, 0


def main(out: str) -> None:
    rt = init_runtime("cpu")
    lm = tiny_llama(VOCAB, seed=0, num_layers=2, pad_token_id=PAD, eos_token_id=EOS)
    plain = PolicyWithLoss(copy.deepcopy(lm))
    actor = shard_model(PolicyWithLoss(lm), device=rt.device, train=True)
    units = sum(isinstance(m, FSDPModule) for m in actor.modules())
    gathers = [0]
    original = param_group.foreach_all_gather

    def counting(*args, **kwargs):
        gathers[0] += 1
        return original(*args, **kwargs)

    param_group.foreach_all_gather = counting
    g = torch.Generator().manual_seed(rt.rank)
    prompts = [torch.randint(2, VOCAB, (int(n),), generator=g).tolist() for n in (3, 7, 5)]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=40 + rt.rank, n=2)
    gen = HFRollout(actor, pad_token_id=PAD, eos_token_id=EOS).generate(prompts, params)
    during = gathers[0]
    ref = HFRollout(plain, pad_token_id=PAD, eos_token_id=EOS).generate(prompts, params)
    layer_weight = actor.lm.model.layers[0].self_attn.q_proj.weight
    resharded = isinstance(layer_weight, DTensor) and layer_weight.to_local().shape[0] < layer_weight.shape[0]
    # training forwards reshard the blocks again after each forward (the setting was restored)
    ids = torch.tensor([[5, 6, 7, 8]])
    before = gathers[0]
    for _ in range(2):
        actor(ids, torch.ones_like(ids), mode="logprobs", prompt_len=2)
    result = {"units": units, "gathers_generate": during, "gathers_two_forwards": gathers[0] - before,
              "tokens_equal": gen.token_ids == ref.token_ids,
              "logprob_diff": max(abs(a - b) for x, y in zip(gen.logprobs, ref.logprobs, strict=True)
                                  for a, b in zip(x, y, strict=True)),
              "rows": len(gen.token_ids), "resharded": resharded}
    results = [None] * rt.world_size
    dist.all_gather_object(results, result)
    if rt.is_main:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
