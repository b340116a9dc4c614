"""Per-phase timeline and peak memory of PPO iterations on a random-weight model (no downloads).

    python -m bench.measure_phases --model qwen0.5b --iterations 3 [--rollout hf|vllm] [--gradient-checkpointing]
                                   [--out F]
    torchrun --nproc_per_node N -m bench.measure_phases ...        (FSDP2 over N ranks)

Builds actor, reference, reward model and critic from one config (``tiny`` = the demo's shape class,
``qwen0.5b`` / ``qwen1.5b`` = those models' shapes, random weights), runs ``--iterations`` PPO iterations
through the real trainer and engine (memory plan, phase hooks, rollout, weight sync) and prints, per
iteration, each phase's seconds and peak memory (CUDA: max allocated; CPU: resident set). The first
iteration includes warm-up. Prompts are random token ids; responses are ``--new-tokens`` long at most.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile

import torch

from bench.measure_sync import QWEN2_05B

SHAPES = {
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256),
    "qwen0.5b": QWEN2_05B,
    "qwen1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                     num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=512,
                     tie_word_embeddings=True),
}


def build_models(shape: str, dtype: torch.dtype):
    """(actor, ref, reward_model, critic): four random-weight copies of one Qwen2-shaped body."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fastrlhf.models import RewardModel, ValueModel
    config = Qwen2Config(**SHAPES[shape], pad_token_id=0, eos_token_id=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        actor = Qwen2ForCausalLM(config).to(dtype).eval()
        reward = RewardModel(copy.deepcopy(actor))
        critic = ValueModel(copy.deepcopy(actor))
    return actor, copy.deepcopy(actor), reward, critic


def run(shape: str, iterations: int, rollout: str, batch: int, new_tokens: int,
        dtype: str, gradient_checkpointing: bool = False) -> tuple[list[dict], dict | None]:
    from fastrlhf.data import build_test_tokenizer
    from fastrlhf.engine.runtime import init_runtime
    from fastrlhf.trainers.ppo import PPOConfig, PPOTrainer, RolloutConfig

    runtime = init_runtime()
    actor, ref, reward, critic = build_models(shape, getattr(torch, dtype))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 100, (int(torch.randint(8, 33, (1,), generator=g)),), generator=g).tolist()
               for _ in range(batch * max(iterations, 1))]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = PPOConfig(output_dir=tmp, iterations=iterations, rollout_batch_size=batch,
                        minibatch_size=max(1, batch // 2), ppo_epochs=1, checkpoint_every=10**9,
                        gradient_checkpointing=gradient_checkpointing, tensorboard=False, rollout=RolloutConfig(backend=rollout, max_new_tokens=new_tokens))
        trainer = PPOTrainer(cfg, actor=actor, ref=ref, reward_model=reward, critic=critic,
                             tokenizer=build_test_tokenizer(), prompts=prompts, runtime=runtime)
        rows = [trainer.iteration(it) for it in range(iterations)]
    plan = runtime.scheduler.plan_dict()
    keep = ("time/", "mem/", "tokens_per_s/")
    return [{k: v for k, v in r.items() if k.startswith(keep)} for r in rows], plan


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", choices=sorted(SHAPES))
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--rollout", default="hf", choices=("hf", "vllm"))
    p.add_argument("--batch", type=int, default=16, help="prompts per rank per iteration")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows, plan = run(args.model, args.iterations, args.rollout, args.batch, args.new_tokens, args.dtype,
                     args.gradient_checkpointing)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return 0
    phases = ("generate", "score", "train", "sync")
    mem = "peak_mb" if torch.cuda.is_available() else "rss_mb"
    print(f"{'iter':>4} " + " ".join(f"{ph + '_s':>10} {ph + '_' + mem:>16}" for ph in phases))
    for i, r in enumerate(rows):
        nan = float("nan")
        cells = [f"{r.get(f'time/{ph}_s', nan):>10.3f} {r.get(f'mem/{ph}_{mem}', nan):>16.1f}"
                 for ph in phases]
        print(f"{i:>4} " + " ".join(cells))
    predicted = (plan or {}).get("predicted_mb") or {}
    if predicted:  # the planner's bytes per phase (the plan the scheduler applied), next to the measurement
        print(f"{'plan':>4} " + " ".join(f"{'':>10} {predicted.get(ph, float('nan')):>16.1f}" for ph in phases)
              + f"   (planner, offload={plan.get('offload')})")
    if args.out:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "device": device, "torch": torch.__version__, "plan": plan,
                       "iterations": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
