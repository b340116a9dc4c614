"""CPU before/after of the padding skip (issue 11, item 2): ``fused_ppo_loss`` fwd + bwd, PyTorch path.

One process per measurement, loading the kernels package from a folder given on the command line, so the
code before the change (e.g. a checkout of main's ``kernels/``) and after run on the same inputs:

    python -m bench.pad_skip_cpu --kernels /path/to/old/kernels --label before
    python -m bench.pad_skip_cpu --kernels kernels --label after

Alternate the two several times (the shared CPU drifts) and take the median of the per-process medians.
Inputs: B = 8 rows of T = 512 tokens (N = 4096), row lengths 32, 96, ..., 480 (exactly 50% padding,
right-padded), H = 256, V = 8192, fp32, one thread; the PPO objective of ``bench/test_bench_ppo_loss.py``.
Prints one line: label, the median and all times in ms, and ms per 1000 valid tokens.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch


def load_kernels(folder: str):
    """The kernels package in ``folder`` as a fresh top-level package (its relative imports resolve)."""
    path = Path(folder).resolve()
    spec = importlib.util.spec_from_file_location("_kernels_under_test", path / "__init__.py",
                                                  submodule_search_locations=[str(path)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", required=True, help="folder of the kernels package to time")
    ap.add_argument("--label", required=True)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--H", type=int, default=256)
    ap.add_argument("--V", type=int, default=8192)
    args = ap.parse_args()
    torch.set_num_threads(1)
    k = load_kernels(args.kernels)
    b, t, h, v = args.B, args.T, args.H, args.V
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([t // (2 * b) + i * t // b for i in range(b)])  # mean t / 2: 50% padding
    mask = torch.arange(t)[None, :] < lengths[:, None]
    hidden = torch.randn(b, t, h, generator=g).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) * h ** -0.5).requires_grad_(True)
    labels = torch.randint(0, v, (b, t), generator=g)
    old = torch.randn(b, t, generator=g) * 0.1 - 9.0
    ref = old + 0.1 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, generator=g)[:, None].expand(b, t)
    loss_kw = dict(ref_logprobs=ref, kl_coef=0.05, kl_kind="k3", entropy_coef=0.01, clip_low=0.2,
                   clip_high=0.28, backend="torch")
    times = []
    for i in range(args.iters + 1):  # the first: warm-up
        hidden.grad = weight.grad = None
        t0 = time.perf_counter()
        loss, _ = k.fused_ppo_loss(hidden, weight, labels, old, adv, mask, **loss_kw)
        loss.backward()
        dt = time.perf_counter() - t0
        if i:
            times.append(dt * 1e3)
    med, valid = statistics.median(times), int(mask.sum())
    print(f"{args.label} N={b * t} valid={valid} median_ms={med:.1f} ms_per_1k_valid={1e3 * med / valid:.2f} "
          f"loss={loss.item():.6f} times={[round(x, 1) for x in times]}", flush=True)


if __name__ == "__main__":
    main()
