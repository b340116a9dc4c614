"""The one harness every fastrlhf benchmark goes through.

A benchmark is a *case*: an op ``name``, a ``provider`` (who computes it), a ``mode`` (``fwd``, ``bwd``,
``full`` = fwd+bwd), a shape and a dtype. ``run_case`` times the case with pytest-benchmark's ``pedantic``
(CUDA-synchronised rounds, fresh autograd graph per round for ``bwd``), measures its peak memory in one
separate run, checks its forward result against the eager composition when the math is the same, and
appends one result row to the session (``BenchSession``), which also writes our own JSON file.

Floors (DESIGN.md, "Performance model"): a case declares the bytes it must move or the FLOPs it must do;
``floor_ms`` divides them by the device's copy bandwidth or matmul rate, measured once per session
(``bench.floors.Rates``), or the figures of ENV.md (3.0 TB/s, 790 TFLOP/s bf16 on H100) when measuring fails.
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bench.floors import Floor, Rates, sync  # noqa: F401  (re-exported: the benches import them from here)

MODES = ("fwd", "bwd", "full")
PROFILES = ("quick", "gpu")
REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"


# ----------------------------------------------------------------------------------------------- profile
def bench_profile() -> str:
    """``FASTRLHF_BENCH`` (quick | gpu), else gpu when CUDA is available, else quick."""
    p = os.environ.get("FASTRLHF_BENCH", "").strip().lower()
    if p:
        if p not in PROFILES:
            raise ValueError(f"FASTRLHF_BENCH must be one of {PROFILES}, got {p!r}")
        return p
    return "gpu" if torch.cuda.is_available() else "quick"


def auto_backend(device: torch.device) -> str:
    """What ``backend="auto"`` picks for tensors on ``device`` (recorded in the ``fastrlhf`` rows)."""
    from fastrlhf.kernels._backend import resolve_backend
    return resolve_backend("auto", torch.empty(0, device=device))


def bench_device() -> torch.device:
    if bench_profile() == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("FASTRLHF_BENCH=gpu needs a CUDA device")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Timing:
    """Rounds per case. ``budget_s`` caps warmup + timed rounds at roughly that many seconds."""
    warmup: int
    min_rounds: int
    max_rounds: int
    budget_s: float


TIMINGS = {"quick": Timing(warmup=0, min_rounds=3, max_rounds=5, budget_s=0.1),
           "gpu": Timing(warmup=1, min_rounds=5, max_rounds=20, budget_s=1.0)}


# ----------------------------------------------------------------------------------------------- env info
def git_sha() -> str:
    """``FASTRLHF_GIT_SHA`` (set it where the tree travels without .git), else ``git rev-parse``."""
    if os.environ.get("FASTRLHF_GIT_SHA"):
        return os.environ["FASTRLHF_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({model}, {os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    """File-name form: ``NVIDIA-H100-80GB-HBM3`` on CUDA, ``cpu`` on CPU."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^A-Za-z0-9.]+", "-", torch.cuda.get_device_name(device)).strip("-")


def versions() -> dict[str, str]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version}


# ----------------------------------------------------------------------------------------------- session
ROW_KEYS = ("name", "provider", "mode", "tokens", "V", "H", "B", "T", "dtype", "median_ms", "p20_ms",
            "p80_ms", "peak_mem_mb", "floor_ms", "floor_kind", "pct_of_floor", "device", "torch", "triton",
            "git_sha")


class BenchSession:
    """Rows of one pytest session; rewrites the JSON file after every row, so a killed run keeps its rows.

    ``json_path``: where to write (None: do not write). Set by ``FASTRLHF_BENCH_JSON`` (a path, or
    ``auto`` for ``bench/results/<device>-<date>.json``).
    """

    def __init__(self, device: torch.device, profile: str, json_path: Path | None):
        self.device, self.profile, self.json_path = device, profile, json_path
        self.rates = Rates(device)
        self.rows: list[dict] = []
        self.skipped: list[dict] = []
        self.meta = {"device": device_name(device), **versions(), "git_sha": git_sha(),
                     "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"), "profile": profile}

    @staticmethod
    def default_json_path(device: torch.device) -> Path:
        date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
        return RESULTS_DIR / f"{device_slug(device)}-{date}.json"

    def add_row(self, row: dict) -> None:
        self.rows.append(row)
        self.write()

    def add_skip(self, name: str, provider: str, reason: str) -> None:
        entry = {"name": name, "provider": provider, "reason": reason}
        if entry not in self.skipped:
            self.skipped.append(entry)
            self.write()

    def document(self) -> dict:
        note = ("CPU quick mode: tiny shapes on a shared 2-core CPU, the PyTorch path only (no Triton); "
                "a smoke run of the harness, NOT a performance claim." if self.profile == "quick" else
                "GPU mode: real shapes (issue 3).")
        return {**self.meta, "note": note, "rates": self.rates.as_dict(), "rows": self.rows,
                "not_run": self.skipped}

    def write(self) -> None:
        if self.json_path is None:
            return
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.document(), indent=1) + "\n")
        tmp.replace(self.json_path)


def json_path_from_env(device: torch.device) -> Path | None:
    value = os.environ.get("FASTRLHF_BENCH_JSON", "").strip()
    if not value:
        return None
    return BenchSession.default_json_path(device) if value == "auto" else Path(value)


# -------------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One row to be: op ``name``, ``provider``, ``mode``, ``shape`` (keys among N, V, H, B, T), ``dtype``."""
    name: str
    provider: str
    mode: str
    shape: dict
    dtype: torch.dtype
    floors: dict  # mode -> Floor

    @property
    def tokens(self) -> int:
        s = self.shape
        return int(s["N"]) if "N" in s else int(s["B"]) * int(s["T"])

    def row_head(self) -> dict:
        s = self.shape
        return {"name": self.name, "provider": self.provider, "mode": self.mode, "tokens": self.tokens,
                "V": s.get("V"), "H": s.get("H"), "B": s.get("B"), "T": s.get("T"),
                "dtype": str(self.dtype).replace("torch.", "")}


def params(shapes: list[dict], providers: tuple, modes: tuple = MODES, *,
           first_shapes_only: dict | None = None):
    """pytest params ``(shape, provider, mode)``; ``first_shapes_only={"compile": 2}`` runs that provider on
    the first 2 shapes only (torch.compile recompiles for every shape)."""
    import pytest
    limit = first_shapes_only or {}
    return [pytest.param(shape, provider, mode, id=f"{shape_id(shape)}-{provider}-{mode}")
            for i, shape in enumerate(shapes) for provider in providers for mode in modes
            if i < limit.get(provider, len(shapes))]


def shape_id(shape: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in shape.items())


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), ``q`` in [0, 1]."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _Runner:
    """Forward / backward closures over one set of inputs, with fixed upstream gradients."""

    def __init__(self, forward: Callable, inputs: dict, device: torch.device, seed: int = 0):
        self.forward, self.inputs, self.device = forward, inputs, device
        self.leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]
        self.grads: list | None = None
        self.seed = seed
        self.event_ms: list[float] = []  # CUDA-event time of every pedantic round (warmup rounds first)

    def zero(self) -> None:
        for t in self.leaves:
            t.grad = None

    def fwd(self) -> tuple:
        return _as_tuple(self.forward(**self.inputs))

    def make_grads(self, outs: tuple) -> None:
        """Upstream grads: None for a scalar loss, else fixed random values (not all ones)."""
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        self.grads = [None if o.dim() == 0 else
                      torch.randn(o.shape, generator=gen, device=self.device, dtype=o.dtype)
                      for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]

    def bwd(self, outs: tuple) -> None:
        diff = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
        if diff:  # a forward that steps its own optimizer (a PPO step) returns nothing differentiable
            torch.autograd.backward(diff, self.grads)

    def full(self) -> None:
        self.bwd(self.fwd())

    def peak_mb(self, mode: str) -> float | None:
        """Peak allocated memory of one ``mode`` run above what was allocated before it (CUDA only)."""
        if self.device.type != "cuda":
            return None
        self.zero()
        _free(self.device)
        outs = self.fwd() if mode == "bwd" else None
        sync(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        outs = self._run_mode(mode, outs)
        sync(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del outs
        return peak / 2 ** 20

    def one_round_s(self, mode: str) -> float:
        self.zero()
        outs = self.fwd() if mode == "bwd" else None
        sync(self.device)
        start = time.perf_counter()
        self._run_mode(mode, outs)
        sync(self.device)
        return time.perf_counter() - start

    def _run_mode(self, mode: str, outs):
        """One ``mode`` pass (``bwd`` consumes the forward outputs ``outs``); returns what stays alive."""
        if mode == "fwd":
            return self.fwd()
        if mode == "bwd":
            self.bwd(outs)
            return outs
        self.full()
        return None

    def pedantic_args(self, mode: str) -> tuple[Callable, Callable | None]:
        """(target, setup) for ``benchmark.pedantic``: each round synchronises before returning."""
        dev = self.device

        def setup():
            self.zero()
            args = ((self.fwd(),), {}) if mode == "bwd" else None
            sync(dev)
            return args

        def target(outs=None):
            # Nothing is returned: pytest-benchmark would keep a fwd result (and its autograd graph) alive
            # through the next round, doubling the memory that round needs.
            events = None
            if dev.type == "cuda":  # GPU time of the round, without the host's synchronisation overhead
                events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                events[0].record()
            if mode == "fwd":
                self.fwd()
            elif mode == "bwd":
                self.bwd(outs)
            else:
                self.full()
            if events is not None:
                events[1].record()
            sync(dev)
            if events is not None:
                self.event_ms.append(events[0].elapsed_time(events[1]))

        return target, setup


DEFAULT_TOL = {torch.float32: dict(rtol=1e-4, atol=2e-4), torch.float64: dict(rtol=1e-7, atol=1e-7),
               torch.bfloat16: dict(rtol=2e-2, atol=1e-1), torch.float16: dict(rtol=1e-2, atol=5e-2)}


def check_close(outs: tuple, expected, case: Case, tol: dict | None) -> None:
    """The provider's forward equals the eager composition's (a smoke check: tests do the real work)."""
    tol = tol or DEFAULT_TOL[case.dtype]
    for i, (got, want) in enumerate(zip(outs, _as_tuple(expected))):
        try:
            torch.testing.assert_close(got.detach().float(), want.detach().float(), **tol)
        except AssertionError as err:
            raise AssertionError(f"{case.name}/{case.provider} output {i} differs from eager at "
                                 f"{shape_id(case.shape)} {case.dtype}: {err}") from None


def require(session: BenchSession, name: str, provider: str, reason: str | None) -> None:
    """Skip (and list in the JSON's ``not_run``) when ``reason`` says why the provider cannot run."""
    if reason:
        import pytest
        session.add_skip(name, provider, reason)
        pytest.skip(f"{provider}: {reason}")


def _reference_output(reference: Callable | None, inputs: dict, row: dict, device: torch.device):
    """The eager result, computed before the provider runs (Liger's cross entropy overwrites its input).
    When eager itself runs out of memory the check is skipped and the row says so."""
    if reference is None:
        return None
    try:
        with torch.no_grad():
            return reference(**inputs)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
        if not _is_oom(err):
            raise
        row["note"] = (row.get("note", "") + "; " if row.get("note") else "") + "not checked: eager OOM"
        _free(device)
        return None


def past_deadline() -> bool:
    """``FASTRLHF_BENCH_DEADLINE`` (Unix time, set by ``bench.run``) has passed: skip the remaining cases."""
    deadline = os.environ.get("FASTRLHF_BENCH_DEADLINE")
    return bool(deadline) and time.time() > float(deadline)


def _rounds(timing: Timing, seconds: float) -> int:
    fit = int(timing.budget_s / max(seconds, 1e-6))
    return max(timing.min_rounds, min(timing.max_rounds, fit))


def run_case(benchmark, session: BenchSession, case: Case, *, make_inputs: Callable[[], dict],
             forward: Callable, reference: Callable | None = None, tol: dict | None = None,
             extra: dict | None = None, late_extra: Callable[[], dict] | None = None,
             timing: Timing | None = None) -> dict | None:
    """Time ``forward(**make_inputs())`` in ``case.mode``; return the result row (None when disabled).

    ``reference(**inputs)``: the eager composition, compared with the forward result in ``fwd`` mode.
    ``late_extra()``: more row fields known only after the timed rounds (e.g. per-phase times).
    ``timing``: rounds for this case instead of the profile's (whole PPO iterations take seconds).
    With ``--benchmark-disable`` (``make test``) the case runs once as a correctness smoke, no row.
    A CUDA out-of-memory error becomes a row with ``error="OOM"`` (eager at 32k tokens does that).
    """
    if case.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {case.mode!r}")
    if past_deadline():
        import pytest
        pytest.skip("the run's time budget (FASTRLHF_BENCH_DEADLINE) is spent")
    timing = timing or TIMINGS[session.profile]
    row = {**case.row_head(), "median_ms": None, "p20_ms": None, "p80_ms": None, "peak_mem_mb": None,
           "floor_ms": None, "floor_kind": None, "pct_of_floor": None, "rounds": 0, **session.meta,
           **(extra or {})}
    row.pop("date"), row.pop("profile")
    benchmark.group = f"{case.name} {case.mode} {shape_id(case.shape)}"
    try:
        runner = _Runner(forward, make_inputs(), session.device)
        if case.mode == "bwd" and not runner.leaves:
            raise ValueError(f"{case.name}: mode 'bwd' needs inputs that require grad")
        expected = (_reference_output(reference, runner.inputs, row, session.device)
                    if case.mode == "fwd" else None)
        outs = runner.fwd()  # first call: compiles / autotunes, and gives the result to check
        if expected is not None:
            check_close(outs, expected, case, tol)
            del expected
        runner.make_grads(outs)
        del outs
        target, setup = runner.pedantic_args(case.mode)
        if benchmark.disabled:
            benchmark.pedantic(target, setup=setup, rounds=1)
            return None
        row["peak_mem_mb"] = runner.peak_mb(case.mode)
        rounds = _rounds(timing, runner.one_round_s(case.mode))
        benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=timing.warmup)
    except NotImplementedError as err:  # e.g. a Triton path that has not landed yet
        require(session, case.name, case.provider, f"not implemented: {err}")
    except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
        if not _is_oom(err):
            raise
        row["error"] = "OOM"
        runner = None
    finally:
        _free(session.device)
    if benchmark.stats is not None and row.get("error") is None:
        data = sorted(1e3 * s for s in benchmark.stats.stats.data)
        row["timer"] = "perf_counter"
        if runner.event_ms:  # CUDA: the rounds' event times (pytest-benchmark's table keeps wall times)
            data, row["timer"] = sorted(runner.event_ms[-len(data):]), "cuda_events"
        row.update(median_ms=percentile(data, 0.5), p20_ms=percentile(data, 0.2),
                   p80_ms=percentile(data, 0.8), rounds=len(data))
        if row.get("valid_tokens"):  # rows over padded batches: the time per valid token as well
            row["us_per_valid_token"] = 1e3 * row["median_ms"] / row["valid_tokens"]
        floor_ms, kind = case.floors.get(case.mode, Floor()).ms(session.rates, case.dtype)
        row.update(floor_ms=floor_ms, floor_kind=kind,
                   pct_of_floor=None if floor_ms is None else 100.0 * floor_ms / row["median_ms"])
    if late_extra is not None and row.get("error") is None:
        row.update(late_extra())
    benchmark.extra_info.update(row)
    session.add_row(row)
    if row.get("error"):
        import pytest
        pytest.skip(f"{case.name}/{case.provider}/{case.mode}: {row['error']}")
    return row
