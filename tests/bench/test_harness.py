"""The bench harness: percentiles, floors, the result row schema, the JSON file, the summary's target
verdicts, part merging, and the eager baseline computing the library's numbers."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from bench import eager
from bench.harness import ROW_KEYS, BenchSession, Case, Floor, Rates, params, percentile, run_case, shape_id
from bench.report import group_rows, summarize, target_checks
from bench.run import merge
from fastrlhf.kernels import fused_ppo_loss_from_logits, linear_token_logprobs, token_logprobs


class FakeBenchmark:
    """Stands in for pytest-benchmark's fixture: runs ``pedantic`` for real and keeps the round times."""

    def __init__(self, times_s=None, disabled=False):
        self.disabled, self.extra_info, self.group, self.stats = disabled, {}, None, None
        self._times, self.calls = times_s, []

    def pedantic(self, target, setup=None, rounds=1, warmup_rounds=0):
        self.calls.append((rounds, warmup_rounds))
        for _ in range(warmup_rounds + rounds):
            args, kwargs = (setup() or ((), {})) if setup else ((), {})
            target(*args, **kwargs)
        if not self.disabled:
            data = self._times or [0.001] * rounds
            self.stats = SimpleNamespace(stats=SimpleNamespace(data=list(data)))


def test_percentile_interpolates_like_numpy():
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert percentile(values, 0.5) == 3.0
    assert percentile(values, 0.2) == pytest.approx(1.8)
    assert percentile(values, 0.8) == pytest.approx(5.2)
    assert percentile([7.0], 0.2) == 7.0


def test_floor_from_bytes_and_flops():
    rates = Rates(torch.device("cpu"), bandwidth_bps=2e9, matmul_flops={"bfloat16": 4e12})
    assert Floor(bytes=2e6).ms(rates, torch.bfloat16) == (pytest.approx(1.0), "bandwidth")
    assert Floor(flops=8e12).ms(rates, torch.bfloat16) == (pytest.approx(2000.0), "matmul")
    assert Floor().ms(rates, torch.bfloat16) == (None, None)


def test_params_limits_a_provider_to_the_first_shapes():
    shapes = [dict(N=1, V=2), dict(N=3, V=4)]
    got = [p.values for p in params(shapes, ("eager", "compile"), ("fwd",), first_shapes_only={"compile": 1})]
    assert got == [(shapes[0], "eager", "fwd"), (shapes[0], "compile", "fwd"), (shapes[1], "eager", "fwd")]
    assert shape_id(shapes[1]) == "N3-V4"


def _logprob_case(mode, tmp_path, times=None):
    session = BenchSession(torch.device("cpu"), "quick", tmp_path / "r.json")
    session.rates = Rates(torch.device("cpu"), bandwidth_bps=1e9)
    shape = dict(B=2, T=3, V=11)
    case = Case("token_logprobs", "torch", mode, shape, torch.float32,
                {m: Floor(bytes=k * 2 * 3 * 11 * 4) for m, k in (("fwd", 1), ("bwd", 2), ("full", 3))})

    def make_inputs():
        gen = torch.Generator().manual_seed(0)
        return {"logits": torch.randn(2, 3, 11, generator=gen).requires_grad_(True),
                "labels": torch.randint(0, 11, (2, 3), generator=gen)}
    forward = lambda logits, labels: token_logprobs(logits, labels, backend="torch")  # noqa: E731
    bench = FakeBenchmark(times)
    row = run_case(bench, session, case, make_inputs=make_inputs, forward=forward,
                   reference=eager.token_logprobs)
    return session, row, bench


@pytest.mark.parametrize("mode", ["fwd", "bwd", "full"])
def test_run_case_row_schema_and_json(mode, tmp_path):
    session, row, bench = _logprob_case(mode, tmp_path, times=[0.004, 0.001, 0.002, 0.003, 0.005])
    assert set(ROW_KEYS) <= set(row)
    assert (row["name"], row["provider"], row["mode"], row["tokens"], row["V"], row["T"]) == \
        ("token_logprobs", "torch", mode, 6, 11, 3)
    assert row["median_ms"] == pytest.approx(3.0) and row["p20_ms"] == pytest.approx(1.8)
    assert row["p80_ms"] == pytest.approx(4.2) and row["rounds"] == 5
    k = {"fwd": 1, "bwd": 2, "full": 3}[mode]
    assert row["floor_ms"] == pytest.approx(1e3 * k * 264 / 1e9) and row["floor_kind"] == "bandwidth"
    assert row["pct_of_floor"] == pytest.approx(100 * row["floor_ms"] / 3.0)
    assert row["peak_mem_mb"] is None  # CPU: no allocator statistics (documented)
    assert bench.extra_info == row
    doc = json.loads((tmp_path / "r.json").read_text())
    assert {"device", "torch", "triton", "git_sha", "date", "rows"} <= set(doc)
    assert doc["rows"] == [row]


def test_run_case_disabled_runs_once_without_row(tmp_path):
    session = BenchSession(torch.device("cpu"), "quick", None)
    case = Case("token_logprobs", "eager", "full", dict(B=1, T=2, V=5), torch.float32, {})
    bench = FakeBenchmark(disabled=True)
    row = run_case(bench, session, case, forward=eager.token_logprobs,
                   make_inputs=lambda: {"logits": torch.randn(1, 2, 5, requires_grad=True),
                                        "labels": torch.tensor([[0, 4]])})
    assert row is None and session.rows == [] and bench.calls == [(1, 0)]


def test_run_case_fails_on_wrong_numbers(tmp_path):
    session = BenchSession(torch.device("cpu"), "quick", None)
    case = Case("token_logprobs", "broken", "fwd", dict(B=1, T=2, V=5), torch.float32, {})
    with pytest.raises(AssertionError, match="differs from eager"):
        run_case(FakeBenchmark(), session, case, reference=eager.token_logprobs,
                 forward=lambda logits, labels: eager.token_logprobs(logits, labels) + 1e-2,
                 make_inputs=lambda: {"logits": torch.randn(1, 2, 5), "labels": torch.tensor([[0, 4]])})


def _row(name, provider, mode, median, peak=None, floor=None, error=None, **shape):
    return dict(name=name, provider=provider, mode=mode, dtype="bfloat16", median_ms=median, peak_mem_mb=peak,
                floor_ms=floor, error=error, **shape)


def test_summary_target_verdicts():
    shape = dict(B=8, T=2048, V=151936)
    rows = [_row("token_logprobs", "fastrlhf", "full", 10.0, floor=9.0, **shape),
            _row("token_logprobs", "eager", "full", 25.0, **shape),
            _row("fused_ppo_loss", "fastrlhf", "full", 10.0, peak=100.0, H=896, **shape),
            _row("fused_ppo_loss", "eager", "full", None, error="OOM", H=896, **shape)]
    lines = target_checks(group_rows(rows))
    assert any(">= 2x eager" in ln and "2.50x eager" in ln and "PASS" in ln for ln in lines)
    assert any("<= 1.25x floor" in ln and "PASS" in ln for ln in lines)
    assert any(">= 1.5x eager" in ln and "eager OOM" in ln and "PASS" in ln for ln in lines)
    gpu = summarize({"profile": "gpu", "rows": rows})
    quick = summarize({"profile": "quick", "rows": rows})
    assert "| PASS |" in gpu and "| PASS |" not in quick and "n/a (not GPU)" in quick


def test_merge_joins_parts(tmp_path):
    a = {"device": "X", "date": "d", "profile": "gpu", "rows": [_row("gae", "eager", "fwd", 1.0, B=1, T=2)],
         "not_run": [{"name": "gae", "provider": "torch", "reason": "r"}], "part": "a"}
    b = {**a, "rows": [_row("gae", "fastrlhf", "fwd", 0.1, B=1, T=2)], "part": "b"}
    t = {"gpu_tests": {"rc": 0, "summary": "3 passed"}}
    paths = []
    for name, doc in (("X-d-part-a.json", a), ("X-d-part-b.json", b), ("X-d-part-tests.json", t)):
        (tmp_path / name).write_text(json.dumps(doc))
        paths.append(tmp_path / name)
    target = merge(paths, tmp_path)
    doc = json.loads(target.read_text())
    assert target.name == "X-d.json" and len(doc["rows"]) == 2 and len(doc["not_run"]) == 1
    assert doc["gpu_tests"]["summary"] == "3 passed" and (tmp_path / "X-d.md").exists()


def test_eager_baseline_computes_the_library_numbers():
    """The eager composition is the same function as the public ops (so speedups compare like with like)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 31, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, 31, (3, 7), generator=gen)
    labels[1, 2] = -100
    kw = dict(temperature=0.7, return_entropy=True)
    for got, want in zip(eager.token_logprobs(logits, labels, **kw),
                         token_logprobs(logits, labels, backend="torch", **kw)):
        torch.testing.assert_close(got, want)
    hidden = torch.randn(3, 7, 5, generator=gen, dtype=torch.float64)
    weight = torch.randn(31, 5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(eager.linear_token_logprobs(hidden, weight, labels),
                               linear_token_logprobs(hidden, weight, labels, backend="torch"))
    mask = torch.arange(7) < torch.tensor([[7], [3], [0]])
    # out-of-vocabulary labels in padding must not matter
    garbage = labels.clamp(min=0).masked_fill(~mask, 10 ** 6)
    old, ref, adv = (torch.randn(3, 7, generator=gen, dtype=torch.float64) for _ in range(3))
    loss_args = dict(ref_logprobs=ref, kl_coef=0.1, kl_kind="k3", entropy_coef=0.01, clip_low=0.2,
                     clip_high=0.3, loss_agg="seq-mean-token-mean")
    torch.testing.assert_close(
        eager.ppo_loss_from_logits(logits, garbage, old, adv, mask, **loss_args),
        fused_ppo_loss_from_logits(logits, garbage, old, adv, mask, backend="torch", **loss_args)[0])


def test_triton_path_through_the_harness_in_the_interpreter(monkeypatch, tmp_path):
    """One tiny case of the ``fastrlhf`` provider on the Triton path (interpreter): the harness times it,
    checks it against eager and records that ``auto`` chose Triton. The bench itself never runs the
    interpreter (too slow); this is its one smoke."""
    from bench.harness import auto_backend
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    session = BenchSession(torch.device("cpu"), "quick", tmp_path / "r.json")
    case = Case("token_logprobs", "fastrlhf", "full", dict(B=2, T=3, V=67), torch.float32, {"full": Floor()})
    gen = torch.Generator().manual_seed(0)
    inputs = {"logits": torch.randn(2, 3, 67, generator=gen),
              "labels": torch.randint(0, 67, (2, 3), generator=gen)}
    row = run_case(FakeBenchmark(), session, case, extra={"backend": auto_backend(torch.device("cpu"))},
                   make_inputs=lambda: {"logits": inputs["logits"].clone().requires_grad_(True),
                                        "labels": inputs["labels"]},
                   forward=lambda logits, labels: token_logprobs(logits, labels))
    assert row["backend"] == "triton" and row["median_ms"] is not None
    fwd = Case("token_logprobs", "fastrlhf", "fwd", dict(B=2, T=3, V=67), torch.float32, {})
    run_case(FakeBenchmark(), session, fwd, make_inputs=lambda: dict(inputs), reference=eager.token_logprobs,
             forward=lambda logits, labels: token_logprobs(logits, labels))


def test_out_of_memory_becomes_a_row_and_a_skip(tmp_path):
    session = BenchSession(torch.device("cpu"), "quick", tmp_path / "r.json")
    case = Case("token_logprobs", "eager", "full", dict(B=1, T=2, V=5), torch.float32, {})

    def forward(logits, labels):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    with pytest.raises(pytest.skip.Exception, match="OOM"):
        run_case(FakeBenchmark(), session, case, forward=forward,
                 make_inputs=lambda: {"logits": torch.randn(1, 2, 5, requires_grad=True),
                                      "labels": torch.tensor([[0, 4]])})
    assert session.rows[0]["error"] == "OOM" and session.rows[0]["median_ms"] is None
    assert json.loads((tmp_path / "r.json").read_text())["rows"][0]["error"] == "OOM"


@pytest.mark.gpu
def test_run_case_on_cuda_uses_events_and_measures_memory(benchmark, tmp_path):
    """The harness's CUDA paths (event timing, peak memory) on one small real case, with pytest-benchmark."""
    device = torch.device("cuda")
    session = BenchSession(device, "gpu", tmp_path / "r.json")
    case = Case("token_logprobs", "fastrlhf", "full", dict(B=2, T=128, V=4096), torch.bfloat16,
                {"full": Floor(bytes=3 * 2 * 128 * 4096 * 2)})

    def make_inputs():
        gen = torch.Generator(device=device).manual_seed(0)
        return {"logits": torch.randn(2, 128, 4096, generator=gen, device=device,
                                      dtype=torch.bfloat16).requires_grad_(True),
                "labels": torch.randint(0, 4096, (2, 128), generator=gen, device=device)}
    row = run_case(benchmark, session, case, make_inputs=make_inputs,
                   forward=lambda logits, labels: token_logprobs(logits, labels))
    if benchmark.disabled:
        pytest.skip("--benchmark-disable: no timing")
    assert row["timer"] == "cuda_events" and row["median_ms"] > 0 and row["floor_ms"] > 0
    # the bf16 logits' gradient (2 MiB) at least; eager would hold ~14 MiB (float32 copy, log-softmax, grads)
    assert 2.0 <= row["peak_mem_mb"] < 10
