"""fused_ppo_loss: clipped PPO surrogate + KL to the reference + entropy bonus, straight from hidden states.

Triton path. The loss is a scalar, so its gradient is computed in the forward pass, chunk by chunk
(the trick of Liger-Kernel's fused linear cross entropy), and backward only scales it by grad_output:

  1. per chunk of tokens: logits = hidden @ W.T (cuBLAS, input dtype; ``_from_logits``: given),
  2. row kernel (``logprobs.py``): lp, entropy, lse per token, online over the vocabulary,
  3. token kernel (here): per-token loss w_t l_t and the coefficients dL/dlp_t, dL/dH_t,
  4. row kernel (``logprobs.py``): dlogits written in place over the chunk's logits,
  5. grad_hidden = dlogits @ W, grad_W += dlogits.T @ hidden (cuBLAS; grad_W summed in fp32).

``fused_ppo_loss_from_logits`` keeps no [N, V] buffer between forward and backward: forward saves lse,
entropy and the token coefficients dL/dlp, dL/dH ([N] each); backward reads the logits once more and
writes dlogits (3 N V e of traffic in all: read, read, write).

The aggregation weights w_t of ``loss_agg`` are known from the mask alone, so each token's coefficient is
local: L = sum_t w_t l_t(lp_t, H_t). Stats come from the public ``losses`` functions on the detached
``[B, T]`` log-probs, so they are those of the PyTorch path by construction.

Padding skip (issue 11): ``fused_ppo_loss`` multiplies valid tokens only (mask true). One ``nonzero`` over
the mask per call (the only host sync: it sizes the compacted batch; the chunk loop's bounds are then
Python ints), hidden / labels / the token terms (old, adv, ref, mask, weights) compacted with
``index_select``, the chunked forward-with-gradient over the n_valid rows, lp / entropy scattered back into
zeros; grad_hidden comes back through ``index_select``'s backward (exactly 0 at masked rows). See
``linear_logprobs.py``. ``fused_ppo_loss_from_logits`` has no GEMM (its row kernels already skip masked rows).
"""
from __future__ import annotations

import copy

import torch

from . import reference
from ._parity import ensure_parity
from ._backend import (autocast_linear_inputs, check_chunk_size, check_labels_in_range, check_linear_inputs,
                       check_logits_labels, check_ppo_inputs, check_temperature, resolve_backend,
                       scatter_rows, valid_row_index)
from ._triton_utils import (CURRENT, Variant, autocast_inputs, check_launchable, device_guard, lazy_jit,
                            reject_float64, rows_3d, tl, triton)
from .linear_logprobs import accumulate_mm, chunk_logits, grad_w_buffer, resolve_chunk_rows
from .logprobs import logprobs_backward, logprobs_forward
from .losses import kl_estimate, masked_mean, ppo_policy_loss

_KL_KINDS = {"k1": 1, "k2": 2, "k3": 3, "abs": 4}  # KL_KIND of the token kernel; 0 = no KL term
_MASKED = -1  # label given to masked-out tokens: the row kernels skip them (valid labels are >= 0)


@lazy_jit
def _ppo_token_kernel(
    lp_ptr, ent_ptr,  # [N] fp32 from the row kernel (0 at masked tokens)
    old_ptr, adv_ptr, ref_ptr,  # [N] fp32 old log-probs, advantages, ref log-probs (ref read if KL_KIND)
    mask_ptr,  # [N] uint8, nonzero = valid token
    w_ptr,  # [N] fp32 aggregation weight of each token (see agg_weights)
    loss_ptr,  # [N] fp32 out: w_t * l_t
    g_lp_ptr, g_ent_ptr,  # [N] fp32 out: dL/dlp_t, dL/dH_t
    N, clip_lo, clip_hi, dual_clip, kl_coef, entropy_coef, log_ratio_clip,
    HAS_DUAL: tl.constexpr, KL_KIND: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per valid token, with r = exp(lp - old) and A the advantage (Schulman et al., 2017):

        s = -A r,  s_c = -A clip(r, clip_lo, clip_hi),  l = s_c if s_c > s else s     dl/dlp = 0 or -A r
        dual clip c (Ye et al., 2020): if A < 0 and -A c < l: l = -A c                 dl/dlp = 0
        KL, d = lp - ref: k1 d (1), k2 d^2/2 (d), k3 e^-d + d - 1 (1 - e^-d), abs |d| (sign d)
        l_t = l + kl_coef kl - entropy_coef H,  loss_t = w_t l_t,
        dL/dlp_t = w_t (dl/dlp + kl_coef dkl/dlp),  dL/dH_t = -w_t entropy_coef.

    Masked tokens: every output 0 and no input read (NaN/inf there cannot leak). k3 uses a Taylor series
    for |d| < 1e-2, where e^-d + d - 1 would cancel.
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_n = offs < N
    valid = tl.load(mask_ptr + offs, mask=in_n, other=0) != 0
    lp = tl.load(lp_ptr + offs, mask=valid, other=0.0)
    old = tl.load(old_ptr + offs, mask=valid, other=0.0)
    adv = tl.load(adv_ptr + offs, mask=valid, other=0.0)
    w = tl.load(w_ptr + offs, mask=valid, other=0.0)
    log_ratio = lp - old  # clamped to +-log_ratio_clip before exp: no gradient past it (as the torch path)
    bounded = tl.minimum(tl.maximum(log_ratio, -log_ratio_clip), log_ratio_clip)
    ratio = tl.exp(bounded)
    surr = -adv * ratio
    surr_c = -adv * tl.minimum(tl.maximum(ratio, clip_lo), clip_hi)
    clipped = surr_c > surr
    loss = tl.where(clipped, surr_c, surr)
    dloss = tl.where(clipped | (bounded != log_ratio), 0.0, surr)
    if HAS_DUAL:
        floor = -adv * dual_clip
        dual = (adv < 0) & (floor < loss)
        loss = tl.where(dual, floor, loss)
        dloss = tl.where(dual, 0.0, dloss)
    if KL_KIND != 0:
        d = lp - tl.load(ref_ptr + offs, mask=valid, other=0.0)
        if KL_KIND == 1:
            kl, dkl = d, tl.full([BLOCK], 1.0, tl.float32)
        elif KL_KIND == 2:
            kl, dkl = 0.5 * d * d, d
        elif KL_KIND == 3:
            small = tl.abs(d) < 1e-2
            em1 = tl.exp(-d) - 1.0
            kl = tl.where(small, d * d * (0.5 - d * (1.0 / 6.0 - d * (1.0 / 24.0))), em1 + d)
            dkl = tl.where(small, d * (1.0 - d * (0.5 - d * (1.0 / 6.0 - d * (1.0 / 24.0)))), -em1)
        else:
            kl, dkl = tl.abs(d), tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        loss += kl_coef * kl
        dloss += kl_coef * dkl
    ent = tl.load(ent_ptr + offs, mask=valid, other=0.0)
    loss -= entropy_coef * ent
    tl.store(loss_ptr + offs, tl.where(valid, w * loss, 0.0), mask=in_n)
    tl.store(g_lp_ptr + offs, tl.where(valid, w * dloss, 0.0), mask=in_n)
    tl.store(g_ent_ptr + offs, tl.where(valid, -w * entropy_coef, 0.0), mask=in_n)


def agg_weights(mask: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """``mask [B, T]`` bool -> ``w [B*T]`` fp32 with ``aggregate(x, mask, loss_agg) = sum_t w_t x_t``.

    token-mean: 1 / N_valid; seq-mean-token-mean: 1 / (rows with any valid token * the row's count);
    seq-mean-token-sum: 1 / rows with any valid token; 0 at masked tokens. On device, no host sync.
    """
    m = mask.reshape(-1, mask.shape[-1]).float()
    if loss_agg == "token-mean":
        return (m / m.sum().clamp(min=1)).reshape(-1)
    count = m.sum(-1, keepdim=True)
    rows = (count > 0).sum().clamp(min=1).float()
    if loss_agg == "seq-mean-token-mean":
        return (m / (count.clamp(min=1) * rows)).reshape(-1)
    return (m / rows).reshape(-1)


def _flat32(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1).to(torch.float32).contiguous()


class TokenTerms:
    """Per-token inputs of the token kernel, flattened to ``[N]`` (fp32; mask uint8), and its scalars."""

    def __init__(self, old_logprobs, advantages, ref_logprobs, mask, *, loss_agg, clip_low, clip_high,
                 dual_clip, kl_coef, kl_kind, entropy_coef, log_ratio_clip=20.0):
        self.old, self.adv = _flat32(old_logprobs), _flat32(advantages)
        use_kl = ref_logprobs is not None and kl_coef != 0
        self.ref = _flat32(ref_logprobs) if use_kl else self.old  # not read without a KL term
        self.mask8 = mask.reshape(-1).contiguous().view(torch.uint8)
        self.w = agg_weights(mask, loss_agg)
        self.clip_lo, self.clip_hi = 1.0 - clip_low, 1.0 + (clip_low if clip_high is None else clip_high)
        self.dual_clip = dual_clip
        self.kl_coef, self.kl_kind = float(kl_coef), (_KL_KINDS[kl_kind] if use_kl else 0)
        self.entropy_coef = float(entropy_coef)
        self.log_ratio_clip = 1e30 if log_ratio_clip is None else float(log_ratio_clip)  # None: no clamp

    def take(self, idx: torch.Tensor) -> "TokenTerms":
        """The same terms at tokens ``idx`` only (the valid rows of the padding skip)."""
        out = copy.copy(self)
        out.old, out.adv, out.ref, out.mask8, out.w = (t.index_select(0, idx) for t in
                                                       (self.old, self.adv, self.ref, self.mask8, self.w))
        return out

    def grads(self, lp: torch.Tensor, ent: torch.Tensor, sl: slice = slice(None)):
        """Launch the token kernel on tokens ``sl``: returns fp32 ``(w_t l_t, dL/dlp_t, dL/dH_t)``."""
        n = lp.numel()
        loss, g_lp, g_ent = (torch.empty(n, dtype=torch.float32, device=lp.device) for _ in range(3))
        if n == 0:
            return loss, g_lp, g_ent
        block = min(triton.next_power_of_2(n), 1024)
        with device_guard(lp):
            _ppo_token_kernel[(triton.cdiv(n, block),)](
                lp, ent, self.old[sl], self.adv[sl], self.ref[sl], self.mask8[sl], self.w[sl], loss, g_lp,
                g_ent, n, self.clip_lo, self.clip_hi, float(self.dual_clip or 0.0), self.kl_coef,
                self.entropy_coef, self.log_ratio_clip, HAS_DUAL=self.dual_clip is not None,
                KL_KIND=self.kl_kind, BLOCK=block, num_warps=4)
        return loss, g_lp, g_ent


def _scale_saved(ctx, grad_output, n_inputs):
    """backward of the fused losses: the gradients computed in forward, times grad_output (in place, so a
    second backward through the same graph fails loudly on the saved tensors' version check)."""
    grads = [None if g is None else g.mul_(grad_output) for g in ctx.saved_tensors]
    return (*grads, *([None] * (n_inputs - len(grads))))


class FusedPPOFromLogitsFunction(torch.autograd.Function):
    """logits ``[..., V]`` -> ``(loss, lp [N], ent [N])``. Forward saves lse, entropy and the token
    coefficients dL/dlp, dL/dH ([N] fp32); backward writes dlogits = (coefficients x grad_output) through
    the backward row kernel: no [N, V] tensor lives between the two. Round 1 (``variant.logits_grad ==
    "forward"``): dlogits computed in forward when a gradient can be asked for (``grad_enabled``: grad mode
    at the call; inside forward it is always off), kept until backward scales it."""

    @staticmethod
    def forward(ctx, logits, labels, terms, temperature, grad_enabled, variant):
        x3 = rows_3d(logits)
        lp, ent, lse = logprobs_forward(x3, labels, temperature, _MASKED, True, variant=variant)
        loss, g_lp, g_ent = terms.grads(lp, ent)
        ctx.round1 = variant.logits_grad == "forward"
        if ctx.round1:
            dx = None
            if ctx.needs_input_grad[0] and grad_enabled:
                dx = torch.empty(x3.shape, dtype=x3.dtype, device=x3.device)
                logprobs_backward(x3, dx, labels, lse, ent, g_lp, g_ent, temperature, _MASKED)
                dx = dx.view(logits.shape)
            ctx.save_for_backward(dx)
        else:
            ctx.save_for_backward(logits, labels, lse, ent, g_lp, g_ent)
            ctx.temperature = temperature
        ctx.mark_non_differentiable(lp, ent)
        return loss.sum(), lp, ent

    @staticmethod
    def backward(ctx, grad_loss, _g_lp, _g_ent):
        if ctx.round1:
            return _scale_saved(ctx, grad_loss, 6)
        logits, labels, lse, ent, g_lp, g_ent = ctx.saved_tensors
        if grad_loss is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        x3 = rows_3d(logits)
        dx = torch.empty(x3.shape, dtype=x3.dtype, device=x3.device)
        logprobs_backward(x3, dx, labels, lse, ent, g_lp * grad_loss, g_ent * grad_loss, ctx.temperature,
                          _MASKED)
        return dx.view(logits.shape), None, None, None, None, None


class FusedPPOFunction(torch.autograd.Function):
    """hidden ``[N, H]``, weight ``[V, H]`` -> ``(loss, lp [N], ent [N])``; grads computed in forward, per
    chunk of ``rows`` tokens (one chunk of logits in memory at a time)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, terms, temperature, rows, grad_enabled, variant):
        n = hidden.shape[0]
        need_h, need_w = (need and grad_enabled for need in ctx.needs_input_grad[:2])
        lp, ent, lse, loss = (torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(4))
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        grad_w = grad_w_buffer(weight, variant) if need_w else None  # fp32: see linear_logprobs.py
        for s in range(0, n, rows):
            sl = slice(s, s + rows)
            h0, z = chunk_logits(hidden[sl], weight, None, labels[sl] != _MASKED)
            z3 = rows_3d(z)
            logprobs_forward(z3, labels[sl], temperature, _MASKED, True, out=(lp[sl], ent[sl], lse[sl]),
                             variant=variant)
            loss[sl], g_lp, g_ent = terms.grads(lp[sl], ent[sl], sl)
            if need_h or need_w:
                logprobs_backward(z3, z3, labels[sl], lse[sl], ent[sl], g_lp, g_ent, temperature, _MASKED)
            if need_h:
                torch.mm(z, weight, out=grad_h[sl])
            if need_w:
                accumulate_mm(grad_w, z.t(), h0)
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(lp, ent)
        return loss.sum(), lp, ent

    @staticmethod
    def backward(ctx, grad_loss, _g_lp, _g_ent):
        return _scale_saved(ctx, grad_loss, 8)


def _stats(lp, ent, old_logprobs, advantages, mask, ref_logprobs, clip_low, clip_high, dual_clip, kl_kind,
           log_ratio_clip=20.0):
    """The stats of the PyTorch path, from the public ``losses`` functions on detached ``[B, T]`` tensors."""
    with torch.no_grad():
        _, stats = ppo_policy_loss(lp, old_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                                   dual_clip=dual_clip, log_ratio_clip=log_ratio_clip)
        if ref_logprobs is not None:
            ref = torch.where(mask, ref_logprobs.to(lp.dtype), 0)
            kl = torch.where(mask, kl_estimate(lp, ref, kl_kind), 0)
            stats["kl"] = masked_mean(kl, mask).float()
        else:
            stats["kl"] = torch.zeros((), dtype=torch.float32, device=lp.device)
        stats["entropy"] = masked_mean(ent, mask).float()
    return stats


def _prepare(op, labels, vocab, old_logprobs, advantages, mask, *, ref_logprobs, kl_coef, kl_kind,
             entropy_coef, clip_low, clip_high, dual_clip, temperature, loss_agg, log_ratio_clip=20.0, **_):
    """Validate the PPO inputs; returns ``(mask, labels [N] with masked tokens = _MASKED, TokenTerms)``."""
    mask = check_ppo_inputs(labels.shape, "labels", old_logprobs, advantages, mask, ref_logprobs=ref_logprobs,
                            kl_coef=kl_coef, kl_kind=kl_kind, loss_agg=loss_agg, clip_low=clip_low,
                            clip_high=clip_high, dual_clip=dual_clip)
    check_temperature(temperature)
    if labels.dim() < 1:
        raise ValueError("labels must be [B, T], got a 0-dim tensor")
    check_launchable(op, labels, old_logprobs, advantages, mask, ref_logprobs)
    check_labels_in_range(torch.where(mask, labels, 0), vocab, ignore_index=0)  # masked labels: any garbage
    labels_eff = torch.where(mask, labels, _MASKED).reshape(-1).long().contiguous()
    terms = TokenTerms(old_logprobs, advantages, ref_logprobs, mask, loss_agg=loss_agg, clip_low=clip_low,
                       clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef, kl_kind=kl_kind,
                       entropy_coef=entropy_coef, log_ratio_clip=log_ratio_clip)
    return mask, labels_eff, terms


def _finish(loss, lp, ent, labels, old_logprobs, advantages, mask, *, ref_logprobs, clip_low, clip_high,
            dual_clip, kl_kind, return_logprobs, log_ratio_clip=20.0, **_):
    """``[N]`` outputs of the Functions -> the API's ``(loss, stats[, logprobs])``."""
    lp, ent = lp.view(labels.shape), ent.view(labels.shape)
    stats = _stats(lp, ent, old_logprobs, advantages, mask, ref_logprobs, clip_low, clip_high, dual_clip,
                   kl_kind, log_ratio_clip)
    return (loss, stats, lp) if return_logprobs else (loss, stats)


def fused_ppo_loss(hidden, weight, labels, old_logprobs, advantages, mask, *, ref_logprobs=None, kl_coef=0.0,
                   kl_kind="k3", entropy_coef=0.0, clip_low=0.2, clip_high=None, dual_clip=None, temperature=1.0,
                   loss_agg="token-mean", chunk_size=None, return_logprobs=False, backend="auto",
                   log_ratio_clip=20.0):
    """PPO actor loss from ``hidden [B, T, H]`` and ``weight [V, H]`` (see ../shared/API.md):

    ppo_policy_loss(lp) + kl_coef * agg(kl_estimate(lp, ref_logprobs, kl_kind)) - entropy_coef * agg(H)
    with ``lp, H = linear_token_logprobs(hidden, weight, labels, temperature=...)`` at valid tokens.
    Returns ``(loss, stats)`` or ``(loss, stats, logprobs [B, T] detached)``; stats: clipfrac, approx_kl,
    ratio_mean, kl, entropy (0-dim fp32, no host sync). Triton path: grads for hidden and weight computed
    in the forward pass over chunks of ``chunk_size`` tokens (default ``linear_logprobs.chunk_rows``); no
    ``[B, T, V]`` logits. ``backend="auto"``: Triton on CUDA (and CPU under ``TRITON_INTERPRET=1``),
    except float64 inputs (PyTorch path).

    Padding is skipped (both paths): only tokens with ``mask`` true reach the GEMMs (compacted before
    chunking, results scattered back), so fwd + bwd cost ``6 * n_valid * H * V`` FLOPs; loss, stats,
    logprobs and gradients are those of the full computation (0 at masked positions, grad_hidden exactly 0
    on masked rows, whatever they hold). Cost: one host sync per call (the valid count; none per chunk)
    and one ``[n_valid, H]`` copy of hidden when some token is masked.
    """
    kw = dict(ref_logprobs=ref_logprobs, kl_coef=kl_coef, kl_kind=kl_kind, entropy_coef=entropy_coef,
              clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, temperature=temperature,
              loss_agg=loss_agg, return_logprobs=return_logprobs, log_ratio_clip=log_ratio_clip)
    hidden, weight, _ = autocast_linear_inputs(hidden, weight)  # as F.linear: bf16 h, fp32 W is fine
    _, vocab = check_linear_inputs(hidden, weight, labels)
    check_chunk_size(chunk_size)
    chosen = resolve_backend(backend, hidden)
    if chosen == "torch" or (backend == "auto" and hidden.dtype == torch.float64):
        return reference.fused_ppo_loss(hidden, weight, labels, old_logprobs, advantages, mask,
                                        chunk_size=chunk_size, **kw)
    ensure_parity(hidden.device)
    return _fused_ppo_loss_triton(hidden, weight, labels, old_logprobs, advantages, mask, chunk_size, kw)


def _fused_ppo_loss_triton(hidden, weight, labels, old_logprobs, advantages, mask, chunk_size, kw,
                           variant: Variant = CURRENT):
    """Triton path of ``fused_ppo_loss`` (``kw``: its keyword arguments; ``variant``: internal, for timing)."""
    vocab = weight.shape[0]
    mask, labels_eff, terms = _prepare("fused_ppo_loss", labels, vocab, old_logprobs, advantages, mask, **kw)
    check_launchable("fused_ppo_loss", hidden, weight)
    reject_float64("fused_ppo_loss", hidden=hidden)
    hidden, weight = autocast_inputs(hidden.device, hidden, weight)
    rows = resolve_chunk_rows(chunk_size, weight, variant)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    n = hidden2d.shape[0]
    idx = valid_row_index(labels_eff != _MASKED)  # padding skip: the one host sync of the call
    if idx is not None:  # only valid rows reach the GEMMs; grad_hidden scatters back (0 at masked rows)
        hidden2d, labels_eff = hidden2d.index_select(0, idx), labels_eff.index_select(0, idx)
        terms = terms.take(idx)
    with torch.autocast(hidden.device.type, enabled=False):  # matmuls in the (cast) inputs' dtype
        loss, lp, ent = FusedPPOFunction.apply(hidden2d, weight, labels_eff, terms, float(kw["temperature"]),
                                               rows, torch.is_grad_enabled(), variant)
    lp, ent = scatter_rows(lp, idx, n), scatter_rows(ent, idx, n)
    return _finish(loss, lp, ent, labels, old_logprobs, advantages, mask, **kw)


def fused_ppo_loss_from_logits(logits, labels, old_logprobs, advantages, mask, *, ref_logprobs=None, kl_coef=0.0,
                               kl_kind="k3", entropy_coef=0.0, clip_low=0.2, clip_high=None, dual_clip=None,
                               temperature=1.0, loss_agg="token-mean", chunk_size=None, return_logprobs=False,
                               backend="auto", log_ratio_clip=20.0):
    """Same as ``fused_ppo_loss`` with ``logits [B, T, V]`` given (fp32/bf16/fp16). Triton path: one pass
    over the logits for lp and entropy in forward, one in backward that writes dlogits (logits dtype).
    ``chunk_size`` bounds the PyTorch path's float32 temporaries (rows per chunk); the Triton path works
    row by row and ignores it."""
    kw = dict(ref_logprobs=ref_logprobs, kl_coef=kl_coef, kl_kind=kl_kind, entropy_coef=entropy_coef,
              clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, temperature=temperature,
              loss_agg=loss_agg, return_logprobs=return_logprobs, log_ratio_clip=log_ratio_clip)
    vocab = check_logits_labels(logits, labels)
    check_chunk_size(chunk_size)
    chosen = resolve_backend(backend, logits)
    if chosen == "torch" or (backend == "auto" and logits.dtype == torch.float64):
        return reference.fused_ppo_loss_from_logits(logits, labels, old_logprobs, advantages, mask,
                                                    chunk_size=chunk_size, **kw)
    ensure_parity(logits.device)
    return _fused_ppo_loss_from_logits_triton(logits, labels, old_logprobs, advantages, mask, kw)


def _fused_ppo_loss_from_logits_triton(logits, labels, old_logprobs, advantages, mask, kw,
                                       variant: Variant = CURRENT):
    """Triton path of ``fused_ppo_loss_from_logits`` (``variant``: internal, for timing old against new)."""
    op = "fused_ppo_loss_from_logits"
    mask, labels_eff, terms = _prepare(op, labels, logits.shape[-1], old_logprobs, advantages, mask, **kw)
    check_launchable(op, logits)
    reject_float64(op, logits=logits)
    loss, lp, ent = FusedPPOFromLogitsFunction.apply(logits, labels_eff, terms, float(kw["temperature"]),
                                                     torch.is_grad_enabled(), variant)
    return _finish(loss, lp, ent, labels, old_logprobs, advantages, mask, **kw)
