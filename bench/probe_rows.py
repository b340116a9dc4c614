"""Probe of the forward/backward row kernels: achieved GB/s against a device-to-device copy, with the
compiled kernels' registers and spills. One line per case, JSON, written as it goes.

    python -m bench.probe_rows [--out FILE.jsonl] [--dry-run]

Cases: bf16 logits, N = 8192 rows, V in {151936 (aligned rows), 151665 (odd: rows at every 2-byte
offset)}; the round-2 per-lane forward kernel and round 1's per-block kernel, entropy on and off; the
backward kernel. Bytes: forward reads N V e; backward reads N V e and writes N V e.
"""
from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

import torch

N_ROWS = 8192
VOCABS = (151936, 151665)


def cases() -> list[dict]:
    out = []
    for V in VOCABS:
        for kernel in ("fwd_lanes", "fwd_blocks"):
            for ent in (True, False):
                out.append(dict(kernel=kernel, V=V, entropy=ent))
        out.append(dict(kernel="bwd", V=V, entropy=True))
    return out


def _launch(case: dict, x, labels, lp, ent, lse, dx, g):
    """Launch one kernel as ``logprobs.py`` does; returns triton's compiled-kernel handle."""
    from fastrlhf.kernels._triton_utils import lanes_tile, row_align, row_warps, vocab_block
    mod = importlib.import_module("fastrlhf.kernels.logprobs")
    n, V = x.shape[1], x.shape[-1]
    if case["kernel"] == "fwd_lanes":
        block, warps = lanes_tile(V)
        return mod._logprobs_fwd_lanes_kernel[(n,)](
            x, x.stride(0), x.stride(1), n, labels, lp, ent, lse, V, 1.0, -100,
            HAS_ENTROPY=case["entropy"], BLOCK_V=block, ALIGN=row_align(x), num_warps=warps)
    block = vocab_block(V)
    if case["kernel"] == "fwd_blocks":
        return mod._logprobs_fwd_kernel[(n,)](
            x, x.stride(0), x.stride(1), n, labels, lp, ent, lse, V, 1.0, -100,
            HAS_ENTROPY=case["entropy"], BLOCK_V=block, num_warps=row_warps(block))
    return mod._logprobs_bwd_kernel[(n,)](
        x, x.stride(0), x.stride(1), n, dx, dx.stride(0), dx.stride(1), labels, lse, ent, g, g, V, 1.0, -100,
        HAS_ENT_GRAD=True, BLOCK_V=block, num_warps=row_warps(block))


def _time_ms(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def copy_gbps() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def run(out: Path | None) -> list[dict]:
    rows = []
    copy = copy_gbps()
    print(f"device copy: {copy:.0f} GB/s (read + write)", flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    for V in VOCABS:
        x = (torch.randn(N_ROWS, V, device="cuda", generator=g) * 3).bfloat16().unsqueeze(0)
        labels = torch.randint(0, V, (N_ROWS,), device="cuda", generator=g)
        lp, ent, lse, gr = (torch.zeros(N_ROWS, device="cuda") for _ in range(4))
        dx = torch.empty_like(x)
        for case in (c for c in cases() if c["V"] == V):
            handle = _launch(case, x, labels, lp, ent, lse, dx, gr)
            ms = _time_ms(lambda: _launch(case, x, labels, lp, ent, lse, dx, gr))
            nbytes = x.numel() * 2 * (2 if case["kernel"] == "bwd" else 1)
            gbps = nbytes / ms / 1e6
            row = {**case, "N": N_ROWS, "ms": round(ms, 4), "GBps": round(gbps, 1),
                   "pct_of_copy": round(100 * gbps / copy, 1), "copy_GBps": round(copy, 1),
                   "n_regs": getattr(handle, "n_regs", None), "n_spills": getattr(handle, "n_spills", None)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if out is not None:
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
        del x, dx
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    ap.add_argument("--dry-run", action="store_true", help="list the cases; needs no GPU")
    args = ap.parse_args(argv)
    if args.dry_run or not torch.cuda.is_available():
        importlib.import_module("fastrlhf.kernels.logprobs")
        for c in cases():
            print("probe case:", json.dumps(c))
        if not args.dry_run:
            print("no CUDA device: nothing measured")
        return 0
    t0 = time.time()
    run(args.out)
    print(f"probe done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
