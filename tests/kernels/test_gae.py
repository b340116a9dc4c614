"""gae, Triton path (interpreter on CPU): against the PyTorch reference in float64.

Tolerance: fp32 recurrence over T <= 53 steps: atol 2e-5 on values of order 10 (inputs of every dtype are
compared with the oracle on the same, exactly upcast values).
"""
from __future__ import annotations

import pytest
import torch

from fastrlhf.kernels import gae, reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["full", "ragged", "left", "holes"])
def test_matches_float64_reference(interpret, dtype, kind, make_mask, garbage):
    """B=37 (two row blocks of 32), T=53, NaN/inf garbage at masked positions, an empty row."""
    g = torch.Generator().manual_seed(0)
    B, T = 37, 53
    mask = make_mask(B, T, kind, seed=B)
    rewards = garbage(torch.randn(B, T, generator=g).to(dtype), mask)
    values = garbage(torch.randn(B, T, generator=g).to(dtype), mask)
    adv, ret = gae(rewards, values, mask, gamma=0.99, lam=0.95, backend="triton")
    adv0, ret0 = reference.gae(rewards.double(), values.double(), mask, gamma=0.99, lam=0.95)
    assert adv.dtype == ret.dtype == torch.float32
    torch.testing.assert_close(adv.double(), adv0, atol=2e-5, rtol=0)
    torch.testing.assert_close(ret.double(), ret0, atol=2e-5, rtol=0)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_hand_case_with_hole(interpret):
    """gamma = 0.5, lam = 1, one row with a hole at t = 1: t=2 sees V(next)=0, t=0 skips to t=2."""
    r = torch.tensor([[1.0, 99.0, 2.0]])
    v = torch.tensor([[0.5, 99.0, 1.0]])
    m = torch.tensor([[True, False, True]])
    adv, ret = gae(r, v, m, gamma=0.5, lam=1.0, backend="triton")
    a2 = 2.0 - 1.0                          # delta_2 = r_2 + 0 - V_2
    a0 = (1.0 + 0.5 * 1.0 - 0.5) + 0.5 * a2  # delta_0 + gamma lam A_2
    torch.testing.assert_close(adv, torch.tensor([[a0, 0.0, a2]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, 0.0, a2 + 1.0]]))


def test_strided_inputs_and_int_mask(interpret, make_mask):
    """Non-contiguous rewards/values (a transposed buffer) and a 0/1 integer mask."""
    g = torch.Generator().manual_seed(1)
    B, T = 5, 19
    mask = make_mask(B, T, "holes")
    rewards = torch.randn(T, B, generator=g).t()
    values = torch.randn(B, 2 * T, generator=g)[:, ::2]
    adv, ret = gae(rewards, values, mask.int(), gamma=1.0, lam=0.9, backend="triton")
    adv0, ret0 = reference.gae(rewards.double(), values.double(), mask, gamma=1.0, lam=0.9)
    torch.testing.assert_close(adv.double(), adv0, atol=2e-5, rtol=0)
    torch.testing.assert_close(ret.double(), ret0, atol=2e-5, rtol=0)


def test_auto_backend_and_errors(interpret, monkeypatch):
    r, v, m = torch.randn(2, 4), torch.randn(2, 4), torch.ones(2, 4, dtype=torch.bool)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        gae(r, v, m, backend="triton")
    want = gae(r, v, m)  # torch path
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with monkeypatch.context() as patch:  # auto must now take the Triton path, not the reference
        patch.setattr(reference, "gae", lambda *a, **k: pytest.fail("auto took the PyTorch path"))
        got = gae(r, v, m)
    torch.testing.assert_close(got, want)
    with pytest.raises(TypeError, match="float64"):
        gae(r.double(), v.double(), m, backend="triton")
    assert gae(r.double(), v.double(), m)[0].dtype == torch.float64  # auto: float64 goes to the reference
    with pytest.raises(ValueError, match="values must have the shape"):
        gae(r, v[:, :3], m, backend="triton")
    empty = gae(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.bool), backend="triton")
    assert empty[0].shape == (0, 4)


def test_kernel_compiles_for_sm90():
    pytest.importorskip("triton.backends.nvidia")
    import sys

    from fastrlhf.kernels._triton_utils import compile_for_cuda
    mod = sys.modules["fastrlhf.kernels.gae"]
    compile_for_cuda(mod._gae_kernel, {
        "r_ptr": "*fp32", "stride_rb": "i64", "stride_rt": "i64", "v_ptr": "*bf16", "stride_vb": "i64",
        "stride_vt": "i64", "m_ptr": "*u8", "stride_mb": "i64", "stride_mt": "i64", "adv_ptr": "*fp32",
        "ret_ptr": "*fp32", "B": "i32", "T": "i32", "gamma": "fp32", "gamma_lam": "fp32"}, {"BLOCK_B": 32},
        num_warps=1)


@pytest.mark.gpu
def test_gpu_large_batch():
    """B=256, T=2048 on the GPU: same as the reference in float64."""
    g = torch.Generator(device="cuda").manual_seed(0)
    B, T = 256, 2048
    lengths = torch.randint(1, T + 1, (B,), device="cuda", generator=g)
    mask = torch.arange(T, device="cuda")[None] >= (T - lengths)[:, None]
    r = torch.randn(B, T, device="cuda", generator=g) * 0.1
    v = torch.randn(B, T, device="cuda", generator=g)
    adv, ret = gae(r, v, mask, gamma=1.0, lam=0.95, backend="triton")
    adv0, ret0 = reference.gae(r.double(), v.double(), mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv.double(), adv0, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ret.double(), ret0, atol=1e-4, rtol=1e-5)
