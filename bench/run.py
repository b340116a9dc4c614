"""Everything a GPU session checks and times, in one call: ``python -m bench.run`` (or bench/run_gpu.sh).

1. ``pytest -m gpu tests`` (compiled Triton kernels at real shapes), log kept;
2. ``pytest bench`` in GPU mode (CPU: quick mode), rows written to ``<out>/<device>-<date>.json``;
3. a markdown summary (``bench.report``: speedups vs eager and Liger, % of floor, memory ratios,
   issue 3's targets) next to it, also printed.
When ``$OUT`` is set (the device machine's return folder) the JSON, summary and logs are copied there.
Options: ``--skip-tests``, ``--only EXPR`` (pytest ``-k`` for the bench), ``--out DIR``, ``--quick``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import REPO, RESULTS_DIR, BenchSession, bench_device
from bench.report import summarize


def _pytest(args: list[str], log: Path, env: dict) -> tuple[int, str]:
    """Run pytest in a subprocess, tee its output to ``log``; return (rc, last summary line)."""
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]
    print("$", " ".join(cmd), flush=True)
    lines = []
    with log.open("w") as f, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
            lines.append(line.strip())
    summary = next((ln for ln in reversed(lines) if " in " in ln and ("passed" in ln or "failed" in ln
                                                                      or "skipped" in ln or "error" in ln)), "")
    return proc.returncode, summary.strip("= ")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-tests", action="store_true", help="do not run `pytest -m gpu tests` first")
    ap.add_argument("--only", default=None, help="pytest -k expression selecting bench cases")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON and summary")
    ap.add_argument("--quick", action="store_true", help="CPU quick mode even on a GPU")
    args = ap.parse_args(argv)

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FASTRLHF_BENCH": "quick" if args.quick else
           ("gpu" if bench_device().type == "cuda" else "quick")}
    os.environ["FASTRLHF_BENCH"] = env["FASTRLHF_BENCH"]
    json_path = args.out / BenchSession.default_json_path(bench_device()).name
    args.out.mkdir(parents=True, exist_ok=True)
    env["FASTRLHF_BENCH_JSON"] = str(json_path)
    stem = json_path.with_suffix("")
    start = time.time()

    tests = None
    if not args.skip_tests:
        rc, summary = _pytest(["-q", "-m", "gpu", "tests"], Path(f"{stem}-gpu-tests.log"), env)
        tests = {"rc": rc, "summary": summary}
    bench_args = ["-q", "bench"] + (["-k", args.only] if args.only else [])
    bench_rc, _ = _pytest(bench_args, Path(f"{stem}-bench.log"), env)

    if not json_path.exists():
        print(f"no results written to {json_path}", file=sys.stderr)
        return bench_rc or 1
    doc = json.loads(json_path.read_text())
    if tests is not None:
        doc["gpu_tests"] = tests
    doc["wall_s"] = round(time.time() - start, 1)
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    md = summarize(doc)
    Path(f"{stem}.md").write_text(md)
    print(md)
    out = os.environ.get("OUT")
    if out:
        for p in (json_path, Path(f"{stem}.md"), Path(f"{stem}-gpu-tests.log"), Path(f"{stem}-bench.log")):
            if p.exists():
                shutil.copy(p, out)
    return max(bench_rc, tests["rc"] if tests else 0)


if __name__ == "__main__":
    raise SystemExit(main())
