"""One GPU call that checks and times the kernels (``bash bench/gpu_check.sh``; bench/README.md).

Stages, in priority order, each with a share of the command-time budget (default 330 s, so the call ends
well inside 6 minutes), everything written to ``$OUT/gpu_check/`` as it goes (logs line by line, the
bench JSON after every row, ``summary.json`` after every stage), so a call cut short still returns what
it measured:

1. ``kernels``: ``pytest -m gpu tests/kernels`` (compiled kernels at real shapes: N*V > 2^31, V = 151665,
   grad_W error at 64 chunks, the parity check, bf16 real shapes), 150 s;
2. ``headline``: the bench cases listed in ``bench/headline.txt`` (ours, round-1 variants, eager, Liger),
   GPU profile, until 130 s have passed (the case running then finishes), then the markdown summary;
3. ``phases``: ``python -m bench.measure_phases`` (two PPO iterations of a Qwen2-0.5B-shaped model, fp32
   weights, ``precision: auto`` = bf16 compute with fp32 masters, 1-rank FSDP2, HF rollout): each phase's
   measured peak with the memory planner's prediction under it, 60 s;
4. ``probe``: ``python -m bench.probe_rows`` (row kernels' GB/s against a device copy, registers, spills),
   30 s;
5. ``rest``: ``pytest -m gpu tests --ignore=tests/kernels`` with the time left.

No torch.compile provider, no Triton interpreter, no timed PPO step. ``--dry-run`` (any machine, no GPU): every
stage collects its cases and imports its modules instead of running, and the call exits non-zero if
anything fails to collect or import.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADLINE = REPO / "bench" / "headline.txt"
# (stage, share of the budget in seconds at the default budget of 330 s)
STAGES = (("kernels", 150), ("headline", 130), ("phases", 60), ("probe", 30), ("rest", None))
NO_TESTS = 5  # pytest's exit code when nothing was selected


def headline_ids() -> list[str]:
    lines = (ln.strip() for ln in HEADLINE.read_text().splitlines())
    return [ln for ln in lines if ln and not ln.startswith("#")]


def stage_command(stage: str, dry: bool, env: dict, out_dir: Path) -> list[str]:
    py, pytest = sys.executable, [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
    collect = ["--collect-only", "-q"] if dry else ["-q", "-rfEs"]
    if stage == "kernels":
        return [*pytest, *collect, "-m", "gpu", "tests/kernels"]
    if stage == "headline":
        return [*pytest, *collect, *headline_ids()]
    if stage == "phases":
        if dry:
            return [py, "-c", "import bench.measure_phases"]
        return [py, "-m", "bench.measure_phases", "--model", "qwen0.5b", "--iterations", "2", "--batch", "8",
                "--new-tokens", "64", "--out", str(out_dir / "phases.json")]
    if stage == "probe":
        return [py, "-m", "bench.probe_rows", *(["--dry-run"] if dry else ["--out", str(out_dir / "probe.jsonl")])]
    return [*pytest, *collect, "-m", "gpu", "tests", "--ignore=tests/kernels"]


def run_stage(cmd: list[str], log: Path, env: dict, timeout_s: float) -> tuple[int, str, float]:
    """Run ``cmd`` (own process group), tee to ``log`` line by line; kill it after ``timeout_s`` (rc 124)."""
    t0 = time.time()
    print("$", " ".join(cmd), flush=True)
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        timer = threading.Timer(timeout_s, lambda: os.killpg(proc.pid, signal.SIGKILL))
        timer.start()
        last = ""
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                f.write(line)
                f.flush()
                if line.strip():
                    last = line.strip()
            rc = proc.wait()
        finally:
            timer.cancel()
        if rc == -signal.SIGKILL:
            rc, last = 124, f"stopped after {timeout_s:.0f} s (stage budget); last line: {last}"
            f.write(last + "\n")
    return rc, last.strip("= "), time.time() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="collect and import every stage; run nothing")
    ap.add_argument("--budget-s", type=float, default=330.0, help="command time for all stages")
    ap.add_argument("--stages", default=",".join(s for s, _ in STAGES), help="comma-separated subset")
    args = ap.parse_args(argv)
    start = time.time()
    base = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "bench" / "results"
    out_dir = base / ("gpu_check-dry-run" if args.dry_run else "gpu_check")
    out_dir.mkdir(parents=True, exist_ok=True)
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    slug = "".join(c if c.isalnum() or c == "." else "-" for c in device).strip("-")
    bench_json = out_dir / f"{slug}-{dt.date.today().isoformat()}-headline.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FASTRLHF_BENCH": "gpu", "FASTRLHF_BENCH_JSON": str(bench_json)}
    scale = args.budget_s / 330.0
    summary = {"device": device, "torch": torch.__version__, "dry_run": args.dry_run,
               "git_sha": os.environ.get("FASTRLHF_GIT_SHA"), "budget_s": args.budget_s, "stages": {}}
    failed = []
    for stage, share in STAGES:
        if stage not in args.stages.split(","):
            continue
        left = args.budget_s - (time.time() - start)
        limit = left if share is None else min(share * scale, left)
        if limit < 5:
            summary["stages"][stage] = {"rc": None, "summary": "not run: budget spent"}
            continue
        if stage == "headline":
            env["FASTRLHF_BENCH_DEADLINE"] = str(time.time() + limit - 15)  # the running case finishes
            limit += 30
        cmd = stage_command(stage, args.dry_run, env, out_dir)
        rc, last, secs = run_stage(cmd, out_dir / f"{stage}.log", env, limit)
        summary["stages"][stage] = {"rc": rc, "summary": last, "seconds": round(secs, 1)}
        if stage == "headline" and bench_json.exists():
            from bench.report import summarize
            (out_dir / bench_json.with_suffix(".md").name).write_text(summarize(json.loads(bench_json.read_text())))
        if rc not in (0, NO_TESTS):
            failed.append(stage)
        summary["wall_s"] = round(time.time() - start, 1)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"gpu_check: {'dry run ' if args.dry_run else ''}{'FAILED: ' + ', '.join(failed) if failed else 'ok'} "
          f"in {time.time() - start:.0f} s; results in {out_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
