"""Worker for tests/engine/test_fsdp.py, run as ``torchrun --nproc_per_node 2 fsdp_worker.py OUT.json``.

Every rank builds the same tiny models, shards them through ``prepare_models`` (FSDP2, gloo), trains a
few steps on its half of a fixed batch (grad clipping, AdamW), then checks against a one-process run
of the same steps on the whole batch (rank 0, unsharded copies). Results go to OUT.json from rank 0.
"""
from __future__ import annotations

import copy
import json
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from fastrlhf.engine.fsdp import full_state_dict, is_fsdp, offload_to_cpu, onload, save_hf_pretrained
from fastrlhf.engine.runtime import init_runtime, prepare_models
from fastrlhf.engine.weight_sync import iter_weight_buckets
from fastrlhf.models import RewardModel, ValueModel, tiny_llama
from fastrlhf.rollout.vllm import write_model_dir

VOCAB, B, T, STEPS, CLIP = 101, 4, 11, 3, 0.05


def build(rank: int):
    actor = tiny_llama(VOCAB, seed=0, num_layers=2)
    critic = ValueModel(tiny_llama(VOCAB, seed=1, num_layers=2), head_init_std=0.02)
    torch.manual_seed(100 + rank)  # the RM head is drawn from the global RNG: differs by rank on purpose
    reward = RewardModel(tiny_llama(VOCAB, seed=2, num_layers=2))
    return actor, critic, copy.deepcopy(actor), reward


def batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0  # left padding in one row of each half
    mask[3, :3] = 0  # same valid-token count per half: the mean of the two token means is the full mean
    targets = torch.randn(B, T, generator=g)
    return ids, mask, targets


def losses(actor, critic, ids, mask, targets):
    """Mean over this shard's rows (equal row counts per rank: the mean of shard means = full mean)."""
    labels = ids.masked_fill(mask == 0, -100)
    lm = actor(input_ids=ids, attention_mask=mask, labels=labels).loss
    values = critic(ids, mask)
    vf = ((values - targets) ** 2 * mask).sum(-1).div(mask.sum(-1)).mean()
    return lm + vf


def train(actor, critic, ids, mask, targets):
    params = list(actor.parameters()) + list(critic.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    norms = []
    for _ in range(STEPS):
        opt.zero_grad()
        losses(actor, critic, ids, mask, targets).backward()
        norm = torch.nn.utils.clip_grad_norm_(params, CLIP)  # a DTensor under FSDP2
        norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        opt.step()
    return opt, norms


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a.keys() ^ b.keys()))[:5]
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def main(out_path: str) -> None:
    rt = init_runtime("cpu")
    assert rt.world_size == 2 and torch.distributed.get_backend() == "gloo"
    ids, mask, targets = batch()
    actor, critic, ref, reward = build(rt.rank)
    reference = [copy.deepcopy(m) for m in (actor, critic)] if rt.is_main else None
    rm_head_rank0 = reward.head.weight.detach().clone()
    actor, critic, ref, reward = prepare_models(rt, actor=actor, critic=critic, ref=ref, reward_model=reward)
    with tempfile.TemporaryDirectory() as tmp:  # the vLLM engine's config dir from a sharded LM
        arch = json.loads((write_model_dir(actor, None, tmp) / "config.json").read_text())["architectures"]
    res = {"arch": arch, "all_fsdp": all(is_fsdp(m) for m in (actor, critic, ref, reward)),
           "ref_frozen": not any(p.requires_grad for p in ref.parameters())}
    rows = slice(2 * rt.rank, 2 * rt.rank + 2)
    # Frozen-model forwards through methods other than forward (registered with FSDP2).
    scores = reward(ids[rows], mask[rows])
    all_scores = [torch.zeros_like(scores) for _ in range(2)]
    torch.distributed.all_gather(all_scores, scores.detach())
    opt, norms = train(actor, critic, ids[rows], mask[rows], targets[rows])
    # offload / onload round trip of parameters and optimizer state (host <-> host here: the code path)
    offload_to_cpu(actor, opt)
    onload(actor, opt, device=rt.device)
    actor_sd, critic_sd, rm_sd = full_state_dict(actor), full_state_dict(critic), full_state_dict(reward)
    buckets = [[(n, t.clone()) for n, t in b] for b in iter_weight_buckets(actor, 40 * 1024)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_list = [tmp]
        torch.distributed.broadcast_object_list(tmp_list, src=0)
        wrote = save_hf_pretrained(actor, tmp_list[0])
        rt.barrier()
        if rt.is_main:
            loaded = AutoModelForCausalLM.from_pretrained(tmp_list[0])
            res["saved_vs_gathered"] = max_diff({k: v for k, v in loaded.state_dict().items()}, actor_sd)
        res["wrote"] = wrote
        rt.barrier()
        # head models: the critic through PPO's save_critic, the reward model through export_head_model,
        # both streamed a bucket of whole layers at a time (40 KB buckets: several files)
        from types import SimpleNamespace

        from fastrlhf.engine.checkpoint import export_head_model
        from fastrlhf.models.heads import load_head_model
        from fastrlhf.trainers.ppo_state import save_critic
        reward.reward_mean, reward.reward_std = 0.25, 2.0
        root = Path(tmp_list[0])
        save_critic(SimpleNamespace(critic=critic, runtime=rt, tokenizer=None), root / "critic")
        res["rm_wrote"] = export_head_model(reward, root / "rm", bucket_mb=40 / 1024)
        rt.barrier()
        if rt.is_main:
            vm, rm = ValueModel.from_pretrained(root / "critic"), RewardModel.from_pretrained(root / "rm")
            res["critic_export_class"] = type(load_head_model(root / "critic")).__name__
            res["critic_export_diff"] = max_diff(vm.state_dict(), critic_sd)
            res["rm_export_diff"] = max_diff(rm.state_dict(), rm_sd)
            res["rm_export_stats"] = [rm.reward_mean, rm.reward_std]
            res["rm_export_files"] = len(list((root / "rm").glob("model-*.safetensors")))
            with torch.no_grad():
                res["rm_export_score_diff"] = (torch.cat(all_scores) - rm(ids, mask)).abs().max().item()
        rt.barrier()
    if rt.is_main:
        ref_actor, ref_critic = reference
        ref_opt, ref_norms = train(ref_actor, ref_critic, ids, mask, targets)
        res["actor_diff"] = max_diff(actor_sd, ref_actor.state_dict())
        res["critic_diff"] = max_diff(critic_sd, ref_critic.state_dict())
        res["norm_diff"] = max(abs(a - b) for a, b in zip(norms, ref_norms, strict=True))
        res["clipped"] = min(ref_norms) > CLIP
        res["rm_head_is_rank0"] = torch.equal(rm_sd["head.weight"], rm_head_rank0)
        with torch.no_grad():
            rm_plain = RewardModel(tiny_llama(VOCAB, seed=2, num_layers=2))
            rm_plain.load_state_dict(rm_sd)
            res["rm_score_diff"] = (torch.cat(all_scores) - rm_plain(ids, mask)).abs().max().item()
        flat = [(n, t) for b in buckets for n, t in b]
        res["bucket_names_equal"] = [n for n, _ in flat] == [n for n, _ in ref_actor.named_parameters()]
        res["bucket_diff"] = max_diff(dict(flat), actor_sd)
        res["n_buckets"] = len(buckets)
        res["plan"] = rt.scheduler.plan_dict()
        with open(out_path, "w") as f:
            json.dump(res, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
