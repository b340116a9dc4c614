"""Backend choice: fastrlhf.kernels imports and runs its PyTorch path where triton is not installed."""
import subprocess
import sys

import pytest
import torch

from fastrlhf.kernels import token_logprobs
from fastrlhf.kernels._backend import resolve_backend

# Runs in a fresh interpreter where importing triton fails, as on macOS (no triton wheel there).
_NO_TRITON = r'''
import builtins, importlib.util
real_import, real_find = builtins.__import__, importlib.util.find_spec
def no_triton(name, *a, **k):
    if name == "triton" or name.startswith("triton."):
        raise ImportError("no module named triton")
    return real_import(name, *a, **k)
builtins.__import__ = no_triton
importlib.util.find_spec = lambda n, *a: None if n == "triton" else real_find(n, *a)
import os
os.environ["TRITON_INTERPRET"] = "1"  # even then, auto must not pick a backend that cannot run
import torch
import fastrlhf.kernels as K
x = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
y = torch.randint(0, 11, (2, 5))
lp = K.token_logprobs(x, y)
ref = torch.log_softmax(x, -1).gather(-1, y[..., None])[..., 0]
assert torch.allclose(lp, ref), (lp, ref)
lp.sum().backward()
try:
    K.token_logprobs(x.detach().float(), y, backend="triton")
except RuntimeError as e:
    assert "triton package" in str(e), e
else:
    raise AssertionError("backend='triton' without triton must raise")
print("ok")
'''


def test_kernels_work_without_triton():
    out = subprocess.run([sys.executable, "-c", _NO_TRITON], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_resolve_backend_rules(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("auto", cpu) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", cpu) == "triton"
    assert resolve_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", cpu)
    # the public ops check it too
    with pytest.raises(ValueError, match="backend must be one of"):
        token_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), backend="bogus")


def test_autocast_accepts_bf16_hidden_with_fp32_weight_as_f_linear_does():
    from fastrlhf.kernels import fused_ppo_loss, linear_token_logprobs
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 8, generator=g).bfloat16()
    w = torch.randn(13, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 13, (2, 3), generator=g)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = linear_token_logprobs(h, w, labels, backend="torch")
        loss, _ = fused_ppo_loss(h, w, labels, lp.detach(), torch.ones(2, 3), mask, backend="torch")
    want = torch.log_softmax((h.float() @ w.detach().bfloat16().float().T), -1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(lp, want, atol=2e-2, rtol=2e-2)  # bf16 matmul rounding, as F.linear's
    (lp.sum() + loss).backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()
