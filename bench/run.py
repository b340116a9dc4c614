"""Everything a GPU session checks and times, in one call: ``python -m bench.run`` (or bench/run_gpu.sh).

1. ``pytest -m gpu tests`` (compiled Triton kernels at real shapes), log kept;
2. ``pytest bench`` in GPU mode (CPU: quick mode), rows written to ``<out>/<device>-<date>.json``;
3. a markdown summary (``bench.report``: speedups vs eager and Liger, % of floor, memory ratios,
   issue 3's targets) next to it, also printed.
When ``$OUT`` is set (the device machine's return folder) everything is written there as it goes (the JSON
after every row), so a call cut short by the device tool's limit still returns its rows.
Options: ``--skip-tests``, ``--tests-only``, ``--only EXPR`` (pytest ``-k`` for the bench), ``--part NAME``
(several calls, one file each; join them with ``--merge FILES``), ``--budget-s`` (default 540: cases still
to run then are skipped, so the call ends inside the device tool's 10-minute limit), ``--out DIR``,
``--quick``.
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

# Issue 3's headline comparisons first: when the time budget runs out, the PPO steps are what is left.
BENCH_ORDER = ["bench/test_bench_logprobs.py", "bench/test_bench_linear_logprobs.py",
               "bench/test_bench_ppo_loss.py", "bench/test_bench_gae.py", "bench/test_bench_ppo_step.py"]


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
    words = ("passed", "failed", "skipped", "error")
    summary = next((ln for ln in reversed(lines) if " in " in ln and any(w in ln for w in words)), "")
    return proc.returncode, summary.strip("= ")


def merge(paths: list[Path], out_dir: Path) -> Path:
    """Join part files (``--part``) of one device and date into ``<device>-<date>.json`` + ``.md``."""
    docs = [json.loads(p.read_text()) for p in paths]
    base = next((d for d in docs if d.get("rows")), docs[0])  # a --tests-only part has no metadata
    doc = {k: v for k, v in base.items() if k not in ("rows", "not_run", "part", "selection", "wall_s")}
    doc["rows"] = [r for d in docs for r in d.get("rows", [])]
    doc["not_run"] = [s for i, d in enumerate(docs) for s in d.get("not_run", [])
                      if s not in [x for e in docs[:i] for x in e.get("not_run", [])]]
    doc["parts"] = [p.name for p in paths]
    tests = [d["gpu_tests"] for d in docs if d.get("gpu_tests")]
    if tests:
        doc["gpu_tests"] = tests[0]
    name = paths[0].name.split("-part-")[0].removesuffix(".json") + ".json"
    target = out_dir / name
    target.write_text(json.dumps(doc, indent=1) + "\n")
    target.with_suffix(".md").write_text(summarize(doc))
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-tests", action="store_true", help="do not run `pytest -m gpu tests` first")
    ap.add_argument("--tests-only", action="store_true", help="run `pytest -m gpu tests` only")
    ap.add_argument("--only", default=None, help="pytest -k expression selecting bench cases")
    ap.add_argument("--part", default=None, help="name this run's file <device>-<date>-part-NAME.json")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="skip the bench cases still to run after this many seconds (the device tool's "
                         "command limit is 600 s)")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for the JSON, summary and logs (default: $OUT when set, so a call cut short "
                         "still returns what it wrote; else bench/results)")
    ap.add_argument("--quick", action="store_true", help="CPU quick mode even on a GPU")
    ap.add_argument("--merge", nargs="+", type=Path, default=None, help="join part files and summarize")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS_DIR
    if args.merge:
        print(merge(args.merge, args.out))
        return 0

    start = time.time()
    profile = "quick" if args.quick or bench_device().type != "cuda" else "gpu"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FASTRLHF_BENCH": profile,
           "FASTRLHF_BENCH_DEADLINE": str(start + args.budget_s)}
    name = BenchSession.default_json_path(bench_device()).stem + (f"-part-{args.part}" if args.part else "")
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{name}.json"
    env["FASTRLHF_BENCH_JSON"] = str(json_path)
    stem = json_path.with_suffix("")

    tests = None
    if not args.skip_tests:
        rc, summary = _pytest(["-q", "-m", "gpu", "tests"], Path(f"{stem}-gpu-tests.log"), env)
        tests = {"rc": rc, "summary": summary}
        if args.tests_only:
            json_path.write_text(json.dumps({"gpu_tests": tests}, indent=1) + "\n")
            _copy_out([json_path, Path(f"{stem}-gpu-tests.log")], args.out)
            return rc
    files = BENCH_ORDER + sorted(str(p.relative_to(REPO)) for p in (REPO / "bench").glob("test_bench_*.py")
                                 if str(p.relative_to(REPO)) not in BENCH_ORDER)
    bench_rc, _ = _pytest(["-q", *files] + (["-k", args.only] if args.only else []),
                          Path(f"{stem}-bench.log"), env)

    if not json_path.exists():
        print(f"no results written to {json_path}", file=sys.stderr)
        return bench_rc or 1
    doc = json.loads(json_path.read_text())
    if tests is not None:
        doc["gpu_tests"] = tests
    doc.update(wall_s=round(time.time() - start, 1), part=args.part, selection=args.only)
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    md = summarize(doc)
    Path(f"{stem}.md").write_text(md)
    print(md)
    _copy_out([json_path, Path(f"{stem}.md"), Path(f"{stem}-gpu-tests.log"), Path(f"{stem}-bench.log")],
              args.out)
    return max(bench_rc, tests["rc"] if tests else 0)


def _copy_out(paths: list[Path], written_to: Path) -> None:
    """Copy results into ``$OUT`` (on the device machine only what is written there comes back),
    unless they were written there in the first place."""
    out = os.environ.get("OUT")
    if out and Path(out).resolve() != written_to.resolve():
        for p in paths:
            if p.exists():
                shutil.copy(p, out)


if __name__ == "__main__":
    raise SystemExit(main())
