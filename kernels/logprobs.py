"""token_logprobs: log-probability (and entropy) of labels under softmax(logits / T).

Triton path: one program per token row, one pass over the vocabulary with an online logsumexp that also
carries the entropy; backward writes dlogits directly in the logits dtype (no float32 ``[N, V]``
intermediate). The two row kernels are reused by ``linear_logprobs.py`` and ``ppo_loss.py``.
"""
from __future__ import annotations

import torch

from . import reference
from ._parity import ensure_parity
from ._backend import check_labels_in_range, check_logits_labels, check_temperature, resolve_backend
from ._triton_utils import (CURRENT, Variant, check_launchable, device_guard, lanes_tile, lazy_jit, reject_float64,
                            row_align, row_warps, rows_3d, tl, vocab_block)


@lazy_jit
def _logprobs_fwd_kernel(
    x_ptr, stride_xa, stride_xr, R,  # [A, R, V] logits, fp32/bf16/fp16, row n = (n // R, n % R)
    labels_ptr,  # [N] int64
    lp_ptr,  # [N] fp32 out: log p(label), 0 at ignored rows, NaN for an out-of-range label
    ent_ptr,  # [N] fp32 out: entropy (written only when HAS_ENTROPY), 0 at ignored rows
    lse_ptr,  # [N] fp32 out: logsumexp(z), saved for backward
    V, inv_temp, ignore_index,
    HAS_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One token row: z = x / T, lse = logsumexp(z), lp = z[y] - lse, H = -sum_v p_v log p_v, p = softmax(z).

    Online over vocabulary blocks with running max m, s = sum e^(z - m) and t = sum e^(z - m) (z - m)
    (Milakov & Gimelshein, 2018, extended to the entropy): when m grows to m', s' = a s and
    t' = a (t + (m - m') s) with a = e^(m - m'). At the end lse = m + log s and H = log s - t / s
    (= lse - E_p[z], without the cancellation of a large |z|). Entries at -inf contribute 0.
    Ignored rows (label == ignore_index) read nothing from x.
    """
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    # Columns to read: V, or none for an ignored row. (cols < V) & valid says the same, but the
    # interpreter mistypes a vector & scalar bool mask.
    v_read = tl.where(valid, V, 0)
    x_row = x_ptr + (row // R) * stride_xa + (row % R) * stride_xr
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    t = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(x_row + cols, mask=cols < v_read, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.reduce(z, 0, tl.standard._elementwise_max))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: any finite reference
        alpha = tl.exp(m - m_ref)
        e = tl.exp(z - m_ref)
        if HAS_ENTROPY:
            shift = tl.where(m == float("-inf"), 0.0, m - m_ref)  # s = t = 0 then; avoid -inf * 0
            zm = tl.where(e > 0, z - m_ref, 0.0)  # e = 0 where z = -inf: 0, not 0 * -inf
            t = alpha * (t + shift * s) + tl.reduce(e * zm, 0, tl.standard._sum_combine)
        s = alpha * s + tl.reduce(e, 0, tl.standard._sum_combine)
        m = m_new
    s = tl.where(valid, s, 1.0)  # ignored row: s = 0; keep its (unused) results finite
    lse = m + tl.log(s)
    in_range = (label >= 0) & (label < V)
    z_label = tl.load(x_row + label, mask=valid & in_range, other=0.0).to(tl.float32) * inv_temp
    lp = tl.where(in_range, z_label - lse, float("nan"))
    tl.store(lp_ptr + row, tl.where(valid, lp, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))
    if HAS_ENTROPY:
        tl.store(ent_ptr + row, tl.where(valid, tl.log(s) - t / s, 0.0))


@lazy_jit
def _logprobs_fwd_lanes_kernel(
    x_ptr, stride_xa, stride_xr, R,  # [A, R, V] logits, fp32/bf16/fp16, row n = (n // R, n % R)
    labels_ptr,  # [N] int64
    lp_ptr,  # [N] fp32 out: log p(label), 0 at ignored rows, NaN for an out-of-range label
    ent_ptr,  # [N] fp32 out: entropy (written only when HAS_ENTROPY), 0 at ignored rows
    lse_ptr,  # [N] fp32 out: logsumexp(z), saved for backward
    V, inv_temp, ignore_index,
    HAS_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr, ALIGN: tl.constexpr,
):
    """Same outputs as ``_logprobs_fwd_kernel`` (z = x / T), fewer instructions per element.

    Each lane i of the BLOCK_V-wide tile keeps its own running max m_i of the raw logits x (starting at
    -FLT_MAX, so x - m_i is never inf - inf) and, in base 2 with c = log2(e) / T folded into one multiply,
    s_i = sum 2^(c (x - m_i)) and t_i = sum 2^(c (x - m_i)) c (x - m_i). A new element costs one exp2:
    with d = max(-c |x - m_i|, -200) (2^-200 is 0 in fp32, so the clamp changes nothing but keeps d finite
    for x = -inf), e = 2^d,
      x > m_i:  s_i' = e s_i + 1,  t_i' = e (t_i + d s_i),  m_i' = x;     else  s_i' = s_i + e,  t_i' = t_i + e d.
    (x - m_i is formed before scaling, so rounding is relative to the gap, not to |x|.) One cross-lane
    combine per row at the end: M = max m_i, a_i = 2^(c (m_i - M)), S = sum a_i s_i,
    T = sum a_i (t_i + c (m_i - M) s_i); lse = M / T + ln S, H = ln S - ln2 T / S.
    Layout: unmasked full tiles from the row's first ALIGN-element boundary (16-byte vector loads when
    ALIGN > 1, even where the row start is not aligned, e.g. V = 50257), then two masked tiles: the head
    before that boundary and the tail. Ignored rows read nothing. Elements at -inf contribute 0.
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    FLT_MAX: tl.constexpr = 3.4028234663852886e38
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    v_read = tl.where(valid, V, 0)
    row_off = (row // R) * stride_xa + (row % R) * stride_xr
    neg_c = -inv_temp * LOG2E
    lanes = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], -FLT_MAX, tl.float32)
    s = tl.full([BLOCK_V], 0.0, tl.float32)
    t = tl.full([BLOCK_V], 0.0, tl.float32)
    head = 0
    if ALIGN > 1:
        head = tl.minimum((ALIGN - row_off % ALIGN) % ALIGN, v_read)
    n_full = (v_read - head) // BLOCK_V
    body = row_off + head
    if ALIGN > 1:
        body = tl.multiple_of(body, ALIGN)
    for k in range(0, n_full):
        x = tl.load(x_ptr + body + k * BLOCK_V + lanes).to(tl.float32)
        up = x > m
        d = tl.abs(x - m) * neg_c
        if HAS_ENTROPY:
            d = tl.maximum(d, -200.0)
            e = tl.exp2(d)
            t = tl.where(up, e * (t + d * s), t + e * d)
        else:
            e = tl.exp2(d)
        s = tl.where(up, e * s + 1.0, s + e)
        m = tl.maximum(m, x)
    tail = head + n_full * BLOCK_V
    for part in range(0, 2):  # the masked head (part 0) and tail (part 1)
        cols = tl.where(part == 0, lanes, tail + lanes)
        x = tl.load(x_ptr + row_off + cols, mask=cols < tl.where(part == 0, head, v_read),
                    other=float("-inf")).to(tl.float32)
        up = x > m
        d = tl.abs(x - m) * neg_c
        if HAS_ENTROPY:
            d = tl.maximum(d, -200.0)
            e = tl.exp2(d)
            t = tl.where(up, e * (t + d * s), t + e * d)
        else:
            e = tl.exp2(d)
        s = tl.where(up, e * s + 1.0, s + e)
        m = tl.maximum(m, x)
    # one combine across lanes (and warps)
    m_row = tl.reduce(m, 0, tl.standard._elementwise_max)
    gap = tl.where(s > 0, (m_row - m) * neg_c, 0.0)  # lanes that saw no finite value: s = 0, a = 0
    a = tl.exp2(gap)
    s_row = tl.reduce(a * s, 0, tl.standard._sum_combine)
    s_row = tl.where(valid, s_row, 1.0)  # ignored row: s = 0; keep its (unused) results finite
    log_s = tl.log(s_row)
    lse = m_row * inv_temp + log_s
    in_range = (label >= 0) & (label < V)
    z_label = tl.load(x_ptr + row_off + label, mask=valid & in_range, other=0.0).to(tl.float32) * inv_temp
    lp = tl.where(in_range, z_label - lse, float("nan"))
    tl.store(lp_ptr + row, tl.where(valid, lp, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))
    if HAS_ENTROPY:
        t_row = tl.reduce(a * (t + gap * s), 0, tl.standard._sum_combine)
        tl.store(ent_ptr + row, tl.where(valid, log_s - LN2 * t_row / s_row, 0.0))


@lazy_jit
def _logprobs_bwd_kernel(
    x_ptr, stride_xa, stride_xr, R,  # [A, R, V] logits, fp32/bf16/fp16
    dx_ptr, stride_da, stride_dr,  # [A, R, V] out: dlogits, dtype of its buffer (may alias x: in place)
    labels_ptr,  # [N] int64
    lse_ptr, ent_ptr,  # [N] fp32 from the forward kernel (ent read only when HAS_ENT_GRAD)
    g_lp_ptr, g_ent_ptr,  # [N] fp32 upstream grads dL/dlp, dL/dH (g_ent read only when HAS_ENT_GRAD)
    V, inv_temp, ignore_index,
    HAS_ENT_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """VJP of one token row: with p = softmax(z), log p_v = z_v - lse, z = x / T,

        dL/dx_v = (g_lp (1[v = y] - p_v) - g_ent p_v (log p_v + H)) / T

    (dlp/dz_v = 1[v = y] - p_v; dH/dz_v = -p_v (z_v - E_p z) = -p_v (log p_v + H)). Terms with p_v = 0
    are 0. Ignored rows get exact zeros whatever x and the upstream grads hold there. Each block is read
    before it is written, so ``dx`` may be ``x`` itself.
    """
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    x_row = x_ptr + (row // R) * stride_xa + (row % R) * stride_xr
    dx_row = dx_ptr + (row // R) * stride_da + (row % R) * stride_dr
    v_read = tl.where(valid, V, 0)  # see the forward kernel
    lse = tl.load(lse_ptr + row)
    g_lp = tl.where(valid, tl.load(g_lp_ptr + row), 0.0)
    if HAS_ENT_GRAD:
        g_ent = tl.where(valid, tl.load(g_ent_ptr + row), 0.0)
        ent = tl.load(ent_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(x_row + cols, mask=cols < v_read, other=float("-inf")).to(tl.float32) * inv_temp
        logp = z - lse
        p = tl.exp(logp)
        coef = g_lp
        if HAS_ENT_GRAD:
            coef = coef + g_ent * (tl.where(p > 0, logp, 0.0) + ent)  # p log p = 0 at p = 0
        dz = -p * coef + tl.where(cols == label, g_lp, 0.0)
        tl.store(dx_row + cols, (dz * inv_temp).to(dx_ptr.dtype.element_ty), mask=cols < V)


def logprobs_forward(x3: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int,
                     want_entropy: bool, out: tuple[torch.Tensor, ...] | None = None,
                     variant: Variant = CURRENT):
    """Launch the forward row kernel on ``x3 [A, R, V]`` (see ``rows_3d``), ``labels [A*R]`` int64.

    Returns fp32 ``(lp, ent, lse)`` each ``[A*R]`` (``ent`` is zeros unless ``want_entropy``), written into
    ``out`` (three contiguous fp32 ``[A*R]`` tensors, e.g. slices of whole-batch buffers) when given.
    ``variant.row`` picks the kernel ("lanes", default, or the round-1 "blocks").
    """
    n, V = labels.numel(), x3.shape[-1]
    if out is None:
        lp = torch.empty(n, dtype=torch.float32, device=x3.device)
        out = (lp, torch.empty_like(lp) if want_entropy else torch.zeros_like(lp), torch.empty_like(lp))
    lp, ent, lse = out
    if n == 0:
        return lp, ent, lse
    with device_guard(x3):
        if variant.row == "blocks":
            block = vocab_block(V)
            _logprobs_fwd_kernel[(n,)](x3, x3.stride(0), x3.stride(1), x3.shape[1], labels, lp, ent, lse,
                                       V, 1.0 / temperature, ignore_index,
                                       HAS_ENTROPY=want_entropy, BLOCK_V=block, num_warps=row_warps(block))
        else:
            block, warps = lanes_tile(V)
            _logprobs_fwd_lanes_kernel[(n,)](x3, x3.stride(0), x3.stride(1), x3.shape[1], labels, lp, ent,
                                             lse, V, 1.0 / temperature, ignore_index,
                                             HAS_ENTROPY=want_entropy, BLOCK_V=block, ALIGN=row_align(x3),
                                             num_warps=warps)
    return lp, ent, lse


def logprobs_backward(x3: torch.Tensor, dx3: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                      ent: torch.Tensor, g_lp: torch.Tensor, g_ent: torch.Tensor | None, temperature: float,
                      ignore_index: int) -> torch.Tensor:
    """Launch the backward row kernel: writes dL/dlogits into ``dx3 [A, R, V]`` (may be ``x3``); returns it.

    ``g_lp``, ``g_ent`` ``[A*R]`` (any float dtype; ``g_ent=None`` means no entropy term).
    """
    n, V = labels.numel(), x3.shape[-1]
    if n == 0:
        return dx3
    has_ent = g_ent is not None
    g_lp = g_lp.reshape(-1).float().contiguous()
    g_ent = g_ent.reshape(-1).float().contiguous() if has_ent else g_lp
    block = vocab_block(V)
    with device_guard(x3):
        _logprobs_bwd_kernel[(n,)](x3, x3.stride(0), x3.stride(1), x3.shape[1],
                                   dx3, dx3.stride(0), dx3.stride(1), labels, lse, ent, g_lp, g_ent,
                                   V, 1.0 / temperature, ignore_index,
                                   HAS_ENT_GRAD=has_ent, BLOCK_V=block, num_warps=row_warps(block))
    return dx3


class TokenLogprobsFunction(torch.autograd.Function):
    """logits ``[..., V]`` -> ``(lp [N], ent [N])`` fp32 through the Triton row kernels (no host sync)."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, want_entropy, variant):
        x3 = rows_3d(logits)
        lp, ent, lse = logprobs_forward(x3, labels, temperature, ignore_index, want_entropy, variant=variant)
        ctx.save_for_backward(x3, labels, lse, ent)
        ctx.temperature, ctx.ignore_index, ctx.want_entropy = temperature, ignore_index, want_entropy
        ctx.logits_shape = logits.shape
        ctx.set_materialize_grads(False)
        if not want_entropy:
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        x3, labels, lse, ent = ctx.saved_tensors
        if g_lp is None:
            g_lp = torch.zeros_like(lse)
        g_ent = g_ent if ctx.want_entropy else None
        dx3 = torch.empty(x3.shape, dtype=x3.dtype, device=x3.device)
        logprobs_backward(x3, dx3, labels, lse, ent, g_lp, g_ent, ctx.temperature, ctx.ignore_index)
        return dx3.view(ctx.logits_shape), None, None, None, None, None


def _token_logprobs_triton(logits, labels, temperature, ignore_index, return_entropy,
                           variant: Variant = CURRENT):
    """The Triton path without input validation (``variant``: internal, for timing old against new)."""
    check_launchable("token_logprobs", logits, labels)
    reject_float64("token_logprobs", logits=logits)
    labels1d = labels.reshape(-1).long().contiguous()
    lp, ent = TokenLogprobsFunction.apply(logits, labels1d, float(temperature), int(ignore_index),
                                          return_entropy, variant)
    lp = lp.view(labels.shape)
    return (lp, ent.view(labels.shape)) if return_entropy else lp


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   ignore_index: int = -100, return_entropy: bool = False, backend: str = "auto"):
    """``logits [..., V]`` (fp32/bf16/fp16), ``labels [...]`` int64 -> ``logprobs [...]`` fp32 (and
    ``entropy [...]`` fp32): log softmax(logits / T)[label] and the entropy of softmax(logits / T).

    0.0 (and 0 gradient) where ``labels == ignore_index``. Differentiable w.r.t. ``logits`` through both
    outputs. ``backend="auto"`` runs Triton on CUDA (and on CPU under ``TRITON_INTERPRET=1``), except for
    float64 logits, which take the PyTorch path.
    """
    vocab = check_logits_labels(logits, labels)
    check_temperature(temperature)
    chosen = resolve_backend(backend, logits)
    if chosen == "torch" or (backend == "auto" and logits.dtype == torch.float64):
        return reference.token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index,
                                        return_entropy=return_entropy)
    check_labels_in_range(labels, vocab, ignore_index)
    ensure_parity(logits.device)
    return _token_logprobs_triton(logits, labels, temperature, ignore_index, return_entropy)
