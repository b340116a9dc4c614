"""Worker for tests/engine/test_scale.py: ``torchrun --nproc_per_node 2 scale_worker.py OUT_DIR``.

On 2 gloo ranks: scalable loading (rank 0 reads, rank 1 builds on meta), frozen models in bf16 with fp32
heads, a DCP checkpoint (one .distcp per rank) and its exact restore, the streamed HF export.
Results go to OUT_DIR/result.json from rank 0.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from fastrlhf.engine.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from fastrlhf.engine.fsdp import full_state_dict, is_fsdp
from fastrlhf.engine.loading import causal_lm_source, head_model_source, materialize
from fastrlhf.engine.precision import adamw
from fastrlhf.engine.runtime import init_runtime
from fastrlhf.kernels import masked_whiten
from fastrlhf.models import RewardModel, tiny_llama
from fastrlhf.models.policy import PolicyWithLoss

VOCAB = 97


def batch(rank: int):
    g = torch.Generator().manual_seed(11 + rank)
    ids = torch.randint(0, VOCAB, (2, 9), generator=g)
    return ids, torch.ones_like(ids)


def step(actor, opt, ids, mask) -> float:
    opt.zero_grad(set_to_none=True)
    lp, _, _ = actor(ids, mask, mode="logprobs", prompt_len=3)
    loss = -lp.mean()
    loss.backward()
    opt.step()
    out = loss.detach().clone()
    dist.all_reduce(out)
    return float(out)


def main(out_dir: str) -> None:
    out = Path(out_dir)
    rt = init_runtime("cpu")
    lm_dir, rm_dir = out / "lm", out / "rm"
    if rt.is_main:
        tiny_llama(VOCAB, seed=3, num_layers=2, tie_word_embeddings=True).save_pretrained(lm_dir)
        RewardModel(tiny_llama(VOCAB, seed=4, num_layers=2), reward_mean=0.5, reward_std=2.0).save_pretrained(rm_dir)
    rt.barrier()
    actor = materialize(rt, causal_lm_source(str(lm_dir), wrap=PolicyWithLoss), train=True, precision="fp32")
    reward = materialize(rt, head_model_source(str(rm_dir), RewardModel), train=False, precision="bf16")
    res: dict = {"fsdp": is_fsdp(actor) and is_fsdp(reward)}
    actor_sd = full_state_dict(actor)
    rm_dtypes = {n: str(p.dtype) for n, p in reward.named_parameters()}
    ids, mask = batch(rt.rank)
    scores = reward(ids, mask).detach()
    gathered = [torch.zeros_like(scores) for _ in range(2)]
    dist.all_gather(gathered, scores)
    if rt.is_main:
        original = AutoModelForCausalLM.from_pretrained(lm_dir)
        ref_sd = {f"lm.{k}": v for k, v in original.state_dict().items()}
        res["load_diff"] = max((actor_sd[k] - ref_sd[k]).abs().max().item() for k in ref_sd)
        res["same_keys"] = sorted(actor_sd) == sorted(ref_sd)
        inv = dict(actor.named_buffers())
        res["inv_freq_ok"] = all(torch.equal(b, dict(original.named_buffers())[k[3:]])
                                 for k, b in inv.items() if k.startswith("lm."))
        res["rm_body_bf16"] = all(v == "torch.bfloat16" for k, v in rm_dtypes.items() if k.startswith("body."))
        res["rm_head_fp32"] = rm_dtypes["head.weight"] == "torch.float32"
        res["rm_stats"] = [reward.reward_mean, reward.reward_std]
        plain = RewardModel.from_pretrained(rm_dir)
        plain.body.to(torch.bfloat16)
        want = torch.cat([plain(*batch(r)) for r in range(2)])
        res["rm_score_diff"] = (torch.cat(gathered) - want).abs().max().item()
    # DCP: 2 steps, checkpoint, 2 more steps; restore, the same 2 steps again
    opt = adamw(actor.parameters(), lr=1e-2)
    for _ in range(2):
        step(actor, opt, ids, mask)
    ckpt = save_checkpoint(out / "ckpt" / "step-00000002", models={"actor": actor},
                           optimizers={"actor": (actor, opt)}, state={"step": 2, "note": "x"})
    torch.manual_seed(1234 + rt.rank)
    after = [step(actor, opt, ids, mask) for _ in range(2)] + [torch.rand(()).item()]
    state = load_checkpoint(latest_checkpoint(out / "ckpt"), models={"actor": actor},
                            optimizers={"actor": (actor, opt)})
    torch.manual_seed(1234 + rt.rank)
    again = [step(actor, opt, ids, mask) for _ in range(2)] + [torch.rand(()).item()]
    res["resume_equal"] = after == again
    res["state"] = state
    res["foreach_on_shards"] = opt.param_groups[0]["foreach"] is True and not opt.param_groups[0]["fused"]
    # masked_whiten over the process group == one process whitening the concatenation
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(3, 7, generator=g) for _ in range(2)]
    ms = [torch.rand(3, 7, generator=g) > 0.3 for _ in range(2)]
    mine = masked_whiten(xs[rt.rank], ms[rt.rank], group=dist.group.WORLD)
    both = [torch.zeros_like(mine) for _ in range(2)]
    dist.all_gather(both, mine)
    res["whiten_diff"] = (torch.cat(both) - masked_whiten(torch.cat(xs), torch.cat(ms))).abs().max().item()
    wrote = export_hf(actor, out / "export", bucket_mb=0.01)
    final_sd = full_state_dict(actor)
    rt.barrier()
    if rt.is_main:
        res["files"] = sorted(p.name for p in ckpt.iterdir())
        res["wrote"] = wrote
        loaded = AutoModelForCausalLM.from_pretrained(out / "export")
        res["export_diff"] = max((loaded.state_dict()[k] - final_sd[f"lm.{k}"]).abs().max().item()
                                 for k in loaded.state_dict())
        res["export_files"] = len(list((out / "export").glob("model-*.safetensors")))
        (out / "result.json").write_text(json.dumps(res))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
