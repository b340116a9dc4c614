"""Peak host memory per rank while ``torchrun --nproc_per_node 2`` loads the four PPO models.

    python -m bench.measure_loading --dir /tmp/qwen05b [--out bench/results/loading_cpu.json]

Saves a random-weight Qwen2-0.5B-shaped causal LM (the SFT policy) and a reward model on the same body
into ``--dir`` (once), then launches 2 gloo ranks that load actor, critic (from the reward model),
reference and reward model one after another through ``fastrlhf.trainers.ppo_cli.load_ppo_models``:
rank 0 reads each checkpoint, rank 1 builds on the meta device and receives its FSDP2 shards. Each rank
records its resident set (VmRSS) and its peak (``ru_maxrss``) before loading and after each model.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from bench.measure_sync import QWEN2_05B


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class AnonPeak:
    """Peak of RssAnon (heap, not file pages mapped from safetensors), sampled every 5 ms in a thread."""

    def __init__(self):
        import threading
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.now())

    def take(self) -> float:
        """The peak since the last take (and reset)."""
        peak, self.peak = max(self.peak, self.now()), self.now()
        return peak


def save_models(root: Path) -> int:
    import torch
    from transformers import AutoModel, Qwen2Config, Qwen2ForCausalLM

    from fastrlhf.data import build_test_tokenizer
    from fastrlhf.models import RewardModel
    config = Qwen2Config(**QWEN2_05B)
    if not (root / "sft" / "config.json").is_file():
        torch.manual_seed(0)
        lm = Qwen2ForCausalLM(config)
        lm.save_pretrained(root / "sft")
        build_test_tokenizer().save_pretrained(root / "sft")
        del lm
    if not (root / "rm" / "config.json").is_file():
        RewardModel(AutoModel.from_config(config)).save_pretrained(root / "rm")
    return _numel(config)


def _numel(config) -> int:
    import torch
    from transformers import Qwen2ForCausalLM
    with torch.device("meta"):
        return sum(p.numel() for p in Qwen2ForCausalLM(config).parameters())


def worker(root: Path, out: Path, precision: str) -> None:
    import torch.distributed as dist

    from fastrlhf.engine.runtime import init_runtime
    from fastrlhf.trainers.ppo_config import PPOConfig
    from fastrlhf.trainers.ppo_cli import load_ppo_models
    anon = AnonPeak()
    rows = [{"step": "start", "rss_mb": _rss_mb(), "peak_mb": _peak_mb(), "anon_mb": anon.now(),
             "anon_peak_mb": anon.take()}]
    rt = init_runtime("cpu")
    cfg = PPOConfig(model=str(root / "sft"), reward_model=str(root / "rm"), data="unused", precision=precision)
    import fastrlhf.engine.loading as loading
    original = loading.materialize

    def traced(*args, **kwargs):  # one row per model, in loading order
        model = original(*args, **kwargs)
        rows.append({"step": f"model {len(rows)}", "rss_mb": _rss_mb(), "peak_mb": _peak_mb(),
                     "anon_mb": anon.now(), "anon_peak_mb": anon.take()})
        return model

    loading.materialize = traced
    models = load_ppo_models(cfg, rt)
    gathered = [None] * rt.world_size
    dist.all_gather_object(gathered, rows)
    if rt.is_main:
        out.write_text(json.dumps(gathered))
    del models
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--out", default=None)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--worker", action="store_true")
    args = p.parse_args(argv)
    root = Path(args.dir)
    if args.worker:
        worker(root, Path(args.out), args.precision)
        return 0
    numel = save_models(root)
    raw = root / "ranks.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "bench.measure_loading",
           "--dir", str(root), "--out", str(raw), "--precision", args.precision, "--worker"]
    subprocess.run(cmd, check=True, env=env)
    ranks = json.loads(raw.read_text())
    full_mb = numel * 4 / 2**20
    names = ["start", "actor", "critic", "reference", "reward model"]
    result = {"model": "Qwen2-0.5B shape, random weights", "numel": numel, "full_fp32_mb": round(full_mb, 1),
              "precision": args.precision, "ranks": []}
    print(f"full fp32 model: {numel / 1e6:.1f} M parameters, {full_mb:.0f} MB")
    for r, rows in enumerate(ranks):
        for name, row in zip(names, rows, strict=True):
            row["step"] = name
        peak = max(row["peak_mb"] for row in rows)
        result["ranks"].append({"rank": r, "rows": rows, "peak_mb": round(peak, 1),
                                "final_rss_mb": round(rows[-1]["rss_mb"], 1),
                                "transient_mb": round(peak - rows[-1]["rss_mb"], 1)})
        print(f"rank {r}: " + ", ".join(f"{row['step']} rss {row['rss_mb']:.0f} peak {row['peak_mb']:.0f}"
                                        for row in rows))
        print(f"rank {r}: peak {peak:.0f} MB = {peak / full_mb:.2f} x full fp32; held after loading "
              f"{rows[-1]['rss_mb']:.0f} MB; transient above that {peak - rows[-1]['rss_mb']:.0f} MB")
        held = 0.0
        for row in rows[1:]:  # anonymous memory: what each load added on top of what was held before it
            row["anon_transient_mb"] = round(row["anon_peak_mb"] - held, 1)
            held = row["anon_mb"]
        result["ranks"][-1]["anon_peak_mb"] = round(max(row["anon_peak_mb"] for row in rows), 1)
        print(f"rank {r}: heap (RssAnon) per model: " + ", ".join(
            f"{row['step']} held {row['anon_mb']:.0f} peak {row['anon_peak_mb']:.0f} (load transient "
            f"{row['anon_transient_mb']:.0f} = {row['anon_transient_mb'] / full_mb:.2f} x full)" for row in rows[1:]))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
