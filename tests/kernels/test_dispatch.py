"""Kernel dispatch: launches on the tensors' device (``device_guard``), and the first-use parity check of
the Triton path against the PyTorch path (``_parity``), with its failure path driven by a wrong kernel."""
from __future__ import annotations

import contextlib
import sys
import time
import types

import pytest
import torch

from fastrlhf.kernels import (fused_ppo_loss, fused_ppo_loss_from_logits, gae, linear_token_logprobs,
                              token_logprobs)
from fastrlhf.kernels import _parity
from fastrlhf.kernels._triton_utils import device_guard


def test_device_guard_selects_the_tensors_cuda_device():
    """CUDA tensors: ``torch.cuda.device`` of their own index (not the current device); CPU: a no-op."""
    guard = device_guard(types.SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(device_guard(torch.zeros(1)), contextlib.nullcontext)


def _ops_inputs():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(2, 3, 37, generator=g), torch.randint(0, 37, (2, 3), generator=g)
    h, w = torch.randn(2, 3, 8, generator=g), torch.randn(37, 8, generator=g)
    old, adv, mask = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g), torch.ones(2, 3, dtype=bool)
    return logits, labels, h, w, old, adv, mask


def test_every_launch_runs_inside_the_guard(interpret, monkeypatch):
    """Each op's kernels launch inside ``device_guard`` of an input tensor (row kernels, the PPO token
    kernel, GAE), forward and backward."""
    entered = []

    @contextlib.contextmanager
    def recording(t):
        entered.append(t.device)
        yield

    for name in ("logprobs", "ppo_loss", "gae"):
        monkeypatch.setattr(sys.modules[f"fastrlhf.kernels.{name}"], "device_guard", recording)
    logits, labels, h, w, old, adv, mask = _ops_inputs()
    x = logits.clone().requires_grad_(True)
    counts = []
    for run in (lambda: token_logprobs(x, labels, backend="triton").sum().backward(),
                lambda: linear_token_logprobs(h, w.requires_grad_(True), labels, backend="triton").sum().backward(),
                lambda: fused_ppo_loss_from_logits(x, labels, old, adv, mask, backend="triton")[0].backward(),
                lambda: fused_ppo_loss(h, w, labels, old, adv, mask, backend="triton")[0].backward(),
                lambda: gae(old, adv, mask, backend="triton")):
        before = len(entered)
        run()
        counts.append(len(entered) - before)
    assert counts == [2, 2, 3, 3, 1]  # fwd + bwd row kernels; + the PPO token kernel; one GAE launch
    assert set(entered) == {torch.device("cpu")}


@pytest.mark.gpu
def test_inputs_on_a_second_gpu_without_set_device():
    """Tensors on cuda:1 while cuda:0 is current: same results as the PyTorch path on cuda:1."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    logits, labels, h, w, old, adv, mask = (t.to(dev) for t in _ops_inputs())
    for backend_out in ((token_logprobs(logits, labels, return_entropy=True, backend=b) for b in ("triton", "torch")),
                        (linear_token_logprobs(h, w, labels, backend=b) for b in ("triton", "torch")),
                        (fused_ppo_loss(h, w, labels, old, adv, mask, backend=b)[0] for b in ("triton", "torch")),
                        (gae(old, adv, mask, backend=b) for b in ("triton", "torch"))):
        got, want = list(backend_out)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.cuda.current_device() == 0


def test_parity_check_passes_on_the_real_kernels(interpret):
    """Every op, Triton (interpreter) against the PyTorch path: all within the tolerance."""
    errors = _parity.parity_errors(torch.device("cpu"))
    assert {op for op, _, _ in errors} == {"token_logprobs", "linear_token_logprobs", "fused_ppo_loss",
                                           "fused_ppo_loss_from_logits", "gae"}
    assert all(err <= _parity._TOL for _, _, err in errors), errors


class _WrongKernel:
    """The real forward row kernel, then log-probs shifted by 0.01: a miscompiled kernel, as far as the
    caller can tell."""

    def __init__(self, real):
        self.real = real

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.real[grid](*args, **kw)
            args[5].add_(0.01)  # lp_ptr
        return launch


def test_parity_check_failure_stops_the_first_triton_call(interpret, monkeypatch):
    """With a wrong kernel the first Triton call raises naming kernel_backend=torch; with the right one
    it passes, records the device, and later calls skip the check."""
    mod = sys.modules["fastrlhf.kernels.logprobs"]
    monkeypatch.setattr(_parity, "_CHECKED", set())
    monkeypatch.setattr(_parity, "needs_check", lambda d: str(d) not in _parity._CHECKED)  # CPU stands in for CUDA
    real = mod._logprobs_fwd_lanes_kernel
    monkeypatch.setattr(mod, "_logprobs_fwd_lanes_kernel", _WrongKernel(real))
    logits, labels, *_ = _ops_inputs()
    with pytest.raises(_parity.TritonParityError, match=r"token_logprobs lp: rel\. error .*kernel_backend=torch"):
        token_logprobs(logits, labels, backend="triton")
    assert _parity._CHECKED == set()
    monkeypatch.setattr(mod, "_logprobs_fwd_lanes_kernel", real)
    token_logprobs(logits, labels, backend="triton")
    assert _parity._CHECKED == {"cpu"}
    monkeypatch.setattr(_parity, "parity_errors", lambda d: pytest.fail("checked twice"))
    token_logprobs(logits, labels, backend="triton")
    gae(labels.float(), labels.float(), labels > 3, backend="triton")


def test_no_check_on_cpu_or_the_torch_path(monkeypatch):
    monkeypatch.setattr(_parity, "parity_errors", lambda d: pytest.fail("no check expected"))
    assert not _parity.needs_check(torch.device("cpu"))
    logits, labels, *_ = _ops_inputs()
    token_logprobs(logits, labels, backend="torch")


@pytest.mark.gpu
def test_parity_check_runs_for_real_on_cuda(monkeypatch):
    """On CUDA the first Triton call runs the check (and it passes); a warm re-run takes under a second."""
    monkeypatch.setattr(_parity, "_CHECKED", set())
    logits = torch.randn(4, 1000, device="cuda")
    token_logprobs(logits, torch.randint(0, 1000, (4,), device="cuda"))
    assert _parity._CHECKED == {str(logits.device)}
    t0 = time.perf_counter()
    errors = _parity.parity_errors(logits.device)
    torch.cuda.synchronize()
    assert time.perf_counter() - t0 < 1.0 and all(e <= _parity._TOL for _, _, e in errors), errors
