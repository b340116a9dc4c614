"""gae: Generalized Advantage Estimation over each row's valid tokens (Schulman et al., 2016).

Triton path: one program per block of rows scans T backwards, carrying the value and advantage of the
next valid token per row, so holes in the mask are skipped exactly as in the reference.
"""
from __future__ import annotations

import torch

from . import reference
from ._parity import ensure_parity
from ._backend import check_gae_inputs, resolve_backend
from ._triton_utils import check_launchable, device_guard, lazy_jit, reject_float64, tl, triton


@lazy_jit
def _gae_kernel(
    r_ptr, stride_rb, stride_rt,  # [B, T] rewards, fp32/bf16/fp16
    v_ptr, stride_vb, stride_vt,  # [B, T] values, fp32/bf16/fp16
    m_ptr, stride_mb, stride_mt,  # [B, T] mask, uint8 (a view of the bool mask), nonzero = valid
    adv_ptr, ret_ptr,  # [B, T] fp32 out, contiguous
    B, T, gamma, gamma_lam,
    BLOCK_B: tl.constexpr,
):
    """For t = T-1 .. 0, on the rows of this block where mask[b, t] is set:

        delta_t = r_t + gamma * v_next - v_t,  A_t = delta_t + gamma * lam * A_next,  R_t = A_t + v_t,
        then v_next = v_t, A_next = A_t;

    v_next = A_next = 0 after a row's last valid token; masked positions keep the carry and get 0
    (their r, v are never used, so NaN/inf there cannot leak). No gradient (GAE targets are constants).
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    in_b = rows < B
    rows = rows.to(tl.int64)
    v_next = tl.full([BLOCK_B], 0.0, tl.float32)
    a_next = tl.full([BLOCK_B], 0.0, tl.float32)
    for i in range(0, T):
        t = T - 1 - i
        valid = tl.load(m_ptr + rows * stride_mb + t * stride_mt, mask=in_b, other=0) != 0
        r = tl.load(r_ptr + rows * stride_rb + t * stride_rt, mask=valid, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + rows * stride_vb + t * stride_vt, mask=valid, other=0.0).to(tl.float32)
        a = r + gamma * v_next - v + gamma_lam * a_next
        out = rows * T + t
        tl.store(adv_ptr + out, tl.where(valid, a, 0.0), mask=in_b)
        tl.store(ret_ptr + out, tl.where(valid, a + v, 0.0), mask=in_b)
        v_next = tl.where(valid, v, v_next)
        a_next = tl.where(valid, a, a_next)


def _gae_triton(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    check_launchable("gae", rewards, values, mask)
    reject_float64("gae", rewards=rewards, values=values)
    B, T = rewards.shape
    adv = torch.empty((B, T), dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    if B == 0 or T == 0:
        return adv, ret
    m8 = mask.view(torch.uint8)  # bool -> uint8 is a free reinterpretation
    block_b = min(triton.next_power_of_2(B), 32)
    with device_guard(rewards):
        _gae_kernel[(triton.cdiv(B, block_b),)](
            rewards, rewards.stride(0), rewards.stride(1), values, values.stride(0), values.stride(1),
            m8, m8.stride(0), m8.stride(1), adv, ret, B, T, float(gamma), float(gamma) * float(lam),
            BLOCK_B=block_b, num_warps=1)
    return adv, ret


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95, backend: str = "auto"):
    """``rewards, values, mask [B, T]`` -> ``(advantages, returns)`` ``[B, T]`` fp32.

    delta_t = r_t + gamma V(next valid token) - V_t (0 after a row's last valid token),
    A_t = delta_t + gamma lam A(next valid token), returns = A + V; 0 at masked positions (holes skipped).
    ``backend="auto"`` runs Triton on CUDA (and on CPU under ``TRITON_INTERPRET=1``), except for float64
    inputs, which take the PyTorch path. Not differentiable (advantages are targets).
    """
    mask = check_gae_inputs(rewards, values, mask, gamma, lam)
    chosen = resolve_backend(backend, rewards)
    if chosen == "torch" or (backend == "auto" and torch.float64 in (rewards.dtype, values.dtype)):
        # detached on both paths: advantages and returns are targets, never differentiated through
        return reference.gae(rewards.detach(), values.detach(), mask, gamma=gamma, lam=lam)
    ensure_parity(rewards.device)
    return _gae_triton(rewards.detach(), values.detach(), mask, gamma, lam)
