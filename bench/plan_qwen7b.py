"""`fastrlhf plan` for Qwen2.5-7B-shaped PPO on 1, 2, 4 and 8 80-GiB GPUs: the README's table.

    python bench/plan_qwen7b.py
"""
from __future__ import annotations

import dataclasses

from fastrlhf.engine.planner import GiB, plan_ppo, read_plan_spec

CONFIG = "examples/configs/qwen2.5-7b/ppo_plan.yaml"
VARIANTS = {
    "four models, full fine-tuning": {},
    "LoRA r=16 (three models)": {"lora_rank": 16},
    "shared critic (three models)": {"shared_critic": True},
    "LoRA r=16 + shared critic (two models)": {"lora_rank": 16, "shared_critic": True},
}


def main() -> None:
    print("| setup | GPUs | offload (auto) | GENERATE | SCORE | TRAIN | SYNC | peak GiB/GPU | verdict | "
          "host GiB/GPU | peak with offload=none |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, change in VARIANTS.items():
        for gpus in (1, 2, 4, 8):
            spec = dataclasses.replace(read_plan_spec(CONFIG, gpus=gpus, gpu_memory_gb=80), **change)
            plan = plan_ppo(spec)
            cells = " | ".join(f"{plan.phases[p].total / GiB:.1f}" for p in ("generate", "score", "train", "sync"))
            phase, peak = plan.peak
            print(f"| {name} | {gpus} | {plan.offload} | {cells} | {peak / GiB:.1f} ({phase.upper()}) | "
                  f"{'fits' if plan.fits else 'does not fit'} | {plan.host_bytes / GiB:.0f} | "
                  f"{plan_ppo(spec, 'none').peak[1] / GiB:.1f} |")


if __name__ == "__main__":
    main()
