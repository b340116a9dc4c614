"""Worker for tests/engine/test_lora_fsdp.py:
``torchrun --nproc_per_node 2 lora_ppo_worker.py CONFIG [k=v ...]`` runs ``fastrlhf ppo``
(``ppo_cli.run_from_config``: rank 0 loads, adapters injected before FSDP2 shards) with LoRA, then, on the
trained and still sharded trainer, checks on every rank (a failed assert exits non-zero):

- a sharded model is refused by ``apply_lora`` (adapters go in before sharding);
- only adapters and the value head are trainable, only they got gradients, the frozen base is the SFT model;
- the reference log-probs (the sharded actor with its adapters disabled) equal the base model's;
- the merged weights gathered from the shards (``weight_sync.iter_merged_buckets``, small buckets) and the
  ``final/`` and ``critic/`` exports equal a one-process PEFT merge of the same adapters;
- the DCP checkpoint holds the adapters and heads, not the frozen base.
Prints ``LORA-FSDP-CHECKS-OK`` on rank 0 at the end."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from fastrlhf.trainers.ppo import PPOTrainer

RESPONSES = [[20, 21, 1], [22], [23, 24, 25, 26]]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def check(trainer: PPOTrainer) -> None:
    from fastrlhf.engine.fsdp import full_state_dict, is_fsdp
    from fastrlhf.engine.weight_sync import iter_merged_buckets, merged_policy_names
    from fastrlhf.models import ValueModel, load_causal_lm
    from fastrlhf.models.lora import merged_state_dict
    from fastrlhf.models.policy import PolicyWithLoss
    from fastrlhf.rollout.base import Generation
    from fastrlhf.trainers.common import maybe_apply_lora
    from fastrlhf.trainers.ppo_batch import build_batch

    cfg, rank, out = trainer.config, dist.get_rank(), trainer.output_dir
    assert dist.get_world_size() == 2 and is_fsdp(trainer.actor) and is_fsdp(trainer.critic)
    assert trainer.ref is None  # no fourth model
    bf16 = trainer.runtime.precision == "bf16"  # the frozen base stored in bf16, adapters and heads fp32
    for model, head in ((trainer.actor, "value_head"), (trainer.critic, "head")):
        for name, p in model.named_parameters():
            trained = "lora_" in name or name.startswith(head)
            assert p.requires_grad == trained, name
            assert trained or p.grad is None, name  # nothing reduce-scattered for the frozen base
            assert p.dtype == (torch.bfloat16 if bf16 and not trained else torch.float32), (name, p.dtype)
    wrap = dict(temperature=cfg.rollout.temperature or 1.0, backend=cfg.kernel_backend)
    from fastrlhf.models.lora import apply_lora
    try:  # adapters go in before sharding; a sharded model is refused with one line
        apply_lora(trainer.critic, rank=2)
        raise AssertionError("apply_lora accepted an FSDP2-sharded model")
    except ValueError as err:
        assert "already FSDP2-sharded" in str(err), err

    # the reference log-probs are the base (SFT) model's; the trained actor's differ from them
    ids = [trainer.prompt_ids[i % len(trainer.prompt_ids)] for i in range(len(RESPONSES))]
    batch = build_batch(ids, Generation(RESPONSES, [[-1.0] * len(r) for r in RESPONSES]),
                        pad_token_id=trainer.tokenizer.pad_token_id, device=torch.device("cpu"))
    trainer.score(batch)
    base = PolicyWithLoss(load_causal_lm(cfg.model), **wrap)
    with torch.no_grad():
        want, _, _ = base(batch.input_ids, batch.attention_mask, mode="logprobs", prompt_len=batch.prompt_len)
    m = batch.mask
    ref_err = (batch.ref_logprobs[m] - want[m]).abs().max().item()
    moved = (batch.old_logprobs[m] - batch.ref_logprobs[m]).abs().max().item()
    print(f"rank {rank}: |ref - base| {ref_err:.2e}, |actor - ref| {moved:.2e}", flush=True)
    assert ref_err < (1e-2 if bf16 else 1e-5) and moved > (5e-2 if bf16 else 1e-4)  # bf16: compute noise

    # merged weights gathered from the shards, small buckets (every rank iterates: a collective)
    got = {name: t.clone() for bucket in iter_merged_buckets(trainer.actor, 64 * 1024) for name, t in bucket}
    actor_full, critic_full = full_state_dict(trainer.actor), full_state_dict(trainer.critic)
    if rank == 0:  # one process: the SFT model with the same adapters, merged by PEFT
        plain = maybe_apply_lora(cfg, PolicyWithLoss(load_causal_lm(cfg.model), **wrap))
        plain.load_state_dict(actor_full)
        want_lm = merged_state_dict(plain.lm)
        base_sd = base.lm.state_dict()
        frozen = {k: v for k, v in actor_full.items() if ".base_layer." in k}
        base_of = {k: base_sd[k.removeprefix("lm.").replace(".base_layer.", ".")] for k in frozen}
        assert frozen and all(torch.equal(v, base_of[k].to(v.dtype)) for k, v in frozen.items())
        assert list(got) == merged_policy_names(trainer.actor)
        sync_err = _max_diff(got, {k: want_lm[k] for k in got})
        from transformers import AutoModelForCausalLM
        final = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
        final_err = _max_diff({k: final[k] for k in got}, got)
        critic = maybe_apply_lora(cfg, ValueModel.from_pretrained(Path(cfg.reward_model)))
        critic.load_state_dict(critic_full)
        exported = ValueModel.from_pretrained(out / "critic").state_dict()
        critic_err = _max_diff(exported, merged_state_dict(critic))
        print(f"merged sync vs PEFT {sync_err:.2e}, final/ {final_err:.2e}, critic/ {critic_err:.2e}",
              flush=True)
        # bf16: the gathered weights are the bf16 compute copies (merged in fp32, rounded to bf16 once)
        tol = 5e-3 if bf16 else 1e-6
        assert sync_err < tol and final_err < 1e-6 and critic_err < tol
        from torch.distributed.checkpoint import FileSystemReader
        ckpt = out / "checkpoints" / f"step-{cfg.iterations:08d}"
        keys = list(FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
        assert any("lora_B" in k for k in keys) and not any("base_layer" in k for k in keys), keys[:8]
        print("LORA-FSDP-CHECKS-OK", flush=True)
    dist.barrier()


def main(config: str, overrides: list[str]) -> int:
    from fastrlhf.trainers.ppo_cli import run_from_config
    finish = PPOTrainer.finish

    def finish_then_check(self):
        result = finish(self)
        check(self)
        return result

    PPOTrainer.finish = finish_then_check  # the checks need the trained trainer, after its exports
    return run_from_config(config, overrides)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
