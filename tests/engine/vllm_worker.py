"""Worker for tests/engine/test_hybrid.py: ``torchrun --nproc_per_node 2 vllm_worker.py OUT.json [TP]``.

The hybrid engine end to end on 2 gloo ranks: process group first, FSDP2-sharded PolicyWithLoss actor,
one in-process vLLM engine per rank (``external_launcher``) filled by the bucketed FSDP-aware sync,
greedy generation equal to HF on the full weights, a training step, a second sync, generation from
the new weights, and the phase hooks. Rank 0 writes the results.
"""
from __future__ import annotations

import copy
import json
import sys

import torch

from fastrlhf.data import build_test_tokenizer
from fastrlhf.engine.runtime import init_runtime, make_rollout, prepare_models, sync_weights
from fastrlhf.models import tiny_llama
from fastrlhf.models.policy import PolicyWithLoss
from fastrlhf.rollout.base import SamplingParams

PROMPTS = ["hello", "count 1 2 3 4 5 6 7 8", "red cat and blue dog", "what is 2 + 3 ?", "sort big small"]


def hf_greedy(lm, prompt_ids, max_new, eos):
    out = []
    for p in prompt_ids:
        ids = torch.tensor([p])
        gen = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                          eos_token_id=eos, pad_token_id=eos)[0, len(p):].tolist()
        out.append(gen[:gen.index(eos) + 1] if eos in gen else gen)
    return out


def full_copy(actor, like):
    """An unsharded HF copy of the sharded actor's LM (every rank: full_tensor per parameter)."""
    lm = copy.deepcopy(like)
    state = {n[len("lm."):]: p.full_tensor() for n, p in actor.named_parameters() if n.startswith("lm.")}
    lm.load_state_dict(state, strict=False)
    return lm


def main(out_path: str, tp: int = 1) -> None:
    rt = init_runtime("cpu")
    tok = build_test_tokenizer()
    lm = tiny_llama(len(tok), seed=5, num_layers=2, pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id)
    plain = copy.deepcopy(lm)
    actor = PolicyWithLoss(lm, shared_critic=True)
    actor, _, _, _ = prepare_models(rt, actor=actor, critic=None, ref=None, reward_model=None)
    rollout = make_rollout(rt, "vllm", actor, tok, bucket_mb=0.05, max_model_len=128, tensor_parallel_size=tp)
    ids = [tok(p).input_ids for p in PROMPTS]
    # data-parallel: each rank generates its own shard of prompts (3 and 2: uneven); with tp=2 one
    # engine spans both ranks and each still gets back its own shard
    mine = ids[rt.rank::rt.world_size]
    greedy = SamplingParams(max_new_tokens=10, temperature=0.0)
    res = {"first_sync": dict(rollout.last_sync), "backend": rollout.llm.llm_engine.vllm_config
           .parallel_config.distributed_executor_backend, "world": torch.distributed.get_world_size()}
    first = rollout.generate(mine, greedy).token_ids
    res["first_equal"] = first == hf_greedy(plain, mine, 10, tok.eos_token_id)
    # one optimizer step on a language-modelling loss through the wrapped, sharded actor
    opt = torch.optim.AdamW(actor.parameters(), lr=5e-2)
    batch = torch.tensor([ids[1] + ids[2]])
    out = actor(batch, torch.ones_like(batch), mode="lm", labels=batch)
    out.loss.backward()
    opt.step()
    sched = rt.scheduler
    for phase in ("generate", "score", "train"):
        with sched.phase(phase):
            pass
    stats = sync_weights(rt, actor, rollout)  # the SYNC phase
    with sched.phase("generate"):
        after = rollout.generate(mine, greedy).token_ids
    new_lm = full_copy(actor, plain)
    res["second_equal"] = after == hf_greedy(new_lm, mine, 10, tok.eos_token_id)
    res["changed"] = after != hf_greedy(plain, mine, 10, tok.eos_token_id)
    res["second_sync"] = stats
    res["events"] = [a for _, a in sched.events]
    flags = torch.tensor([float(res["first_equal"]), float(res["second_equal"]), float(res["changed"])])
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)  # every rank must agree
    res["all_ranks"] = flags.tolist()
    if rt.is_main:
        with open(out_path, "w") as f:
            json.dump(res, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
