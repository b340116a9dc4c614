"""LoRA vs full fine-tuning PPO under FSDP2 on 2 gloo ranks (``torchrun -m fastrlhf ppo``), CPU.

A ~13M-parameter Llama-shaped SFT model (hidden 512, 4 layers) and reward model; 2 iterations of 4 prompts
x 16 new tokens, HF rollout, fp32. Full fine-tuning loads four models (actor, critic, reference, reward
model); LoRA (r=16, every linear of the blocks) three: the reference is the actor with its adapters
disabled. Reports, per mode: wall time of the command, the second iteration's phase times, rank 0's peak
RSS, the size of one DCP checkpoint (LoRA: adapters, heads and their AdamW state only) and of final/.

    python bench/measure_lora_fsdp.py
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from fastrlhf.data import build_test_tokenizer
from fastrlhf.engine.distributed import free_port
from fastrlhf.models import RewardModel, tiny_llama

PROMPTS = ["hello cat", "the big red dog is here", "what", "i like the small green bird"] * 2
SHAPE = dict(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=1408)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="lora-fsdp-"))
    tok = build_test_tokenizer()
    lm = tiny_llama(len(tok), seed=0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **SHAPE)
    print(f"model: {sum(p.numel() for p in lm.parameters()) / 1e6:.1f}M parameters")
    lm.save_pretrained(root / "sft")
    tok.save_pretrained(root / "sft")
    RewardModel(tiny_llama(len(tok), seed=1, **SHAPE)).save_pretrained(root / "rm")
    (root / "data.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    base = {"model": str(root / "sft"), "reward_model": str(root / "rm"), "data": str(root / "data.jsonl"),
            "iterations": 2, "rollout_batch_size": 4, "minibatch_size": 2, "ppo_epochs": 1,
            "checkpoint_every": 1, "max_prompt_length": 32, "progress": False, "precision": "fp32",
            "tensorboard": False, "rollout": {"max_new_tokens": 16}}
    try:
        _compare(root, base)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _compare(root: Path, base: dict) -> None:
    for name, extra in (("full", {}), ("lora r=16", {"lora_rank": 16})):
        out = root / name.replace(" ", "").replace("=", "")
        config = root / f"{out.name}.yaml"
        config.write_text(yaml.safe_dump({**base, **extra, "output_dir": str(out)}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={free_port()}", "-m", "fastrlhf", "ppo", "--config", str(config)]
        t0 = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in rows if r.get("stage") == "ppo" and "kl" in r][-1]
        keys = ("time/generate_s", "time/score_s", "time/train_s", "time/sync_s")
        phases = " ".join(f"{k[5:-2]} {last[k]:.2f} s" for k in keys if k in last)
        ckpt = out / "checkpoints" / "step-00000002"
        print(f"{name}: wall {wall:.1f} s; iteration 2: {phases}; "
              f"peak RSS rank 0 {last['mem/peak_rss_mb']:.0f} MB; checkpoint {_size(ckpt) / 2**20:.1f} MB; "
              f"final/ {_size(out / 'final') / 2**20:.1f} MB", flush=True)


if __name__ == "__main__":
    main()
