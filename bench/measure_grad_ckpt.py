"""Memory of one PPO actor train step with and without gradient checkpointing, and AdamW speed (CPU).

    python -m bench.measure_grad_ckpt [--out bench/results/grad_ckpt_cpu.json]

Train step: a 4-layer Llama-shaped actor (hidden 256, vocab 8000), 2 sequences of 1024 tokens (512 prompt,
512 response), ``fused_ppo_loss`` inside ``PolicyWithLoss``, backward, AdamW step; train mode with every
dropout at 0, as the PPO trainer runs it. Each mode runs in a fresh process: reported are the bytes saved
for backward (exact, from ``saved_tensors_hooks``) and the step's peak resident set above the RSS before
it (``ru_maxrss`` - VmRSS). AdamW: 10M parameters, the single-tensor loop vs foreach vs fused, median
seconds per step.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_step(checkpointing: bool) -> dict:
    import torch

    from fastrlhf.engine.precision import adamw, enable_gradient_checkpointing, zero_dropout
    from fastrlhf.models import tiny_llama
    from fastrlhf.models.policy import PolicyWithLoss
    torch.manual_seed(0)
    lm = tiny_llama(8000, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688,
                    max_position_embeddings=2048)
    model = PolicyWithLoss(lm, backend="torch")
    if checkpointing:
        enable_gradient_checkpointing(model)
    zero_dropout(model)
    model.train()
    opt = adamw(model.parameters(), lr=1e-6)
    b, t, p = 2, 1024, 512
    ids = torch.randint(0, 8000, (b, t))
    mask = torch.ones_like(ids)
    r = t - p
    kwargs = dict(old_logprobs=-torch.rand(b, r) - 8, advantages=torch.randn(b, r),
                  mask=torch.ones(b, r, dtype=torch.bool))
    saved = [0]

    def pack(x):
        saved[0] += x.numel() * x.element_size()
        return x

    before = _rss_mb()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss, _, _ = model(ids, mask, mode="loss", prompt_len=p, **kwargs)
    loss.backward()
    opt.step()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"gradient_checkpointing": checkpointing, "saved_for_backward_mb": saved[0] / 2**20,
            "rss_before_mb": before, "peak_rss_mb": peak, "step_peak_above_before_mb": peak - before,
            "seconds": seconds}


def adamw_times(numel: int = 10_000_000, steps: int = 10) -> dict:
    import torch
    out = {}
    for name, kw in (("for-loop", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(numel // 20)) for _ in range(20)]
        for q in params:
            q.grad = torch.randn_like(q)
        opt = torch.optim.AdamW(params, lr=1e-3, **kw)
        opt.step()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--mode", choices=["ckpt", "plain", "adamw"], default=None)
    args = p.parse_args(argv)
    if args.mode:
        res = adamw_times() if args.mode == "adamw" else one_step(args.mode == "ckpt")
        print(json.dumps(res))
        return 0
    results = {}
    for mode in ("plain", "ckpt", "adamw"):
        proc = subprocess.run([sys.executable, "-m", "bench.measure_grad_ckpt", "--mode", mode],
                              capture_output=True, text=True, check=True)
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    plain, ckpt = results["plain"], results["ckpt"]
    results["ratio_saved"] = ckpt["saved_for_backward_mb"] / plain["saved_for_backward_mb"]
    results["ratio_peak"] = ckpt["step_peak_above_before_mb"] / plain["step_peak_above_before_mb"]
    results["ratio_time"] = ckpt["seconds"] / plain["seconds"]
    print(f"one PPO actor train step, 4 layers, 2 x 1024 tokens: saved for backward "
          f"{plain['saved_for_backward_mb']:.0f} MB -> {ckpt['saved_for_backward_mb']:.0f} MB with checkpointing "
          f"(ratio {results['ratio_saved']:.2f}); step peak RSS above start {plain['step_peak_above_before_mb']:.0f} MB "
          f"-> {ckpt['step_peak_above_before_mb']:.0f} MB (ratio {results['ratio_peak']:.2f}); time "
          f"{plain['seconds']:.2f} s -> {ckpt['seconds']:.2f} s")
    a = results["adamw"]
    print("AdamW step at 10M parameters: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in a.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
