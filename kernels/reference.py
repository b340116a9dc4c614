"""Pure-PyTorch path of every fastrlhf.kernels op.

One implementation, three jobs: the CPU fallback (``backend="torch"``), the oracle the Triton
kernels are tested against, and the "eager" baseline of the bench suite. The public functions in
``logprobs.py``, ``linear_logprobs.py``, ``ppo_loss.py`` and ``gae.py`` dispatch here for
``backend="torch"``; every function here validates its inputs with the checks of ``_backend.py``.

Numerical conventions (the Triton kernels match these):
- Math in float32 whatever the input dtype (float64 for float64 input: the test oracle); outputs
  float32 (float64 for float64 input). Matmuls run in the input dtype, as ``hidden @ weight.T`` would.
- ``z = logits / temperature``; ``lse = logsumexp(z)``; ``logprob = z[label] - lse``;
  ``entropy = -sum_v p_v log p_v`` with ``p = softmax(z)`` (terms with ``p_v = 0`` count 0, so -inf
  logits are allowed).
- VJP w.r.t. z: ``g_lp * (onehot(label) - p) - g_ent * p * (log p + entropy)``, divided by T for logits.
- Ignored tokens (``label == ignore_index``, or ``mask == 0`` in the PPO losses) give 0 in every output
  and exactly 0 gradient, whatever their logits / hidden rows hold (NaN and inf included): their rows
  are replaced by zeros with ``torch.where``/``masked_fill`` before any arithmetic.
- Work is done in chunks of rows, so no float32 ``[N, V]`` copy of the logits ever exists; the
  backward pass recomputes each chunk from the saved inputs and the per-row logsumexp.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import (autocast_linear_inputs, check_chunk_size, check_gae_inputs, check_labels_in_range,
                       check_linear_inputs, check_logits_labels, check_ppo_inputs, check_temperature,
                       scatter_rows, valid_row_index)
from .losses import aggregate, kl_estimate, masked_mean, ppo_policy_loss

# A chunk holds at most this many logits (128 MB in float32); a few fp32 temporaries of that size live at once.
CHUNK_ELEMENTS = 1 << 25
MAX_CHUNK_ROWS = 4096


def default_chunk_rows(vocab_size: int) -> int:
    """Rows (tokens) per chunk so that one chunk's float32 logits stay near ``CHUNK_ELEMENTS``."""
    return max(1, min(MAX_CHUNK_ROWS, CHUNK_ELEMENTS // max(vocab_size, 1)))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunk_forward(z: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, want_entropy: bool):
    """``z [n, V]`` scaled logits (compute dtype, ignored rows already 0) -> ``(lp, entropy, lse)`` ``[n]``."""
    lse = torch.logsumexp(z, dim=-1)
    picked = z.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    lp = torch.where(valid, picked - lse, 0)
    ent = None
    if want_entropy:
        logp = z - lse.unsqueeze(-1)
        p = logp.exp()
        # Written as -sum p log p (not lse - sum p z): no cancellation when |z| is large; p = 0 terms are 0.
        ent = torch.where(valid, -torch.where(p > 0, p * logp, 0).sum(-1), 0)
    return lp, ent, lse


def _chunk_grad(z, labels, valid, lse, ent, g_lp, g_ent, temperature: float) -> torch.Tensor:
    """dL/dlogits for one chunk, compute dtype ``[n, V]``, exactly 0 on ignored rows.

    ``g_lp`` / ``g_ent`` are None when that output takes no part in the loss (no work is done for it).
    """
    logp = z - lse.unsqueeze(-1)
    p = logp.exp()
    if g_lp is not None:
        g_lp = torch.where(valid, g_lp.to(z.dtype), 0)
        dz = p * (-g_lp.unsqueeze(-1))
        dz.scatter_add_(-1, torch.where(valid, labels, 0).unsqueeze(-1), g_lp.unsqueeze(-1))
    else:
        dz = torch.zeros_like(z)
    if g_ent is not None:
        g_ent = torch.where(valid, g_ent.to(z.dtype), 0)
        dz -= torch.where(p > 0, p * (logp + ent.unsqueeze(-1)), 0) * g_ent.unsqueeze(-1)
    return dz.div_(temperature)


def _scaled_logits(chunk: torch.Tensor, valid: torch.Tensor, temperature: float, dtype) -> torch.Tensor:
    """Upcast one chunk of logits, zero ignored rows (garbage there must not reach the logsumexp), / T."""
    z = chunk.to(dtype, copy=True)
    return z.masked_fill_(~valid.unsqueeze(-1), 0).div_(temperature)


def _part(t, sl):
    return None if t is None else t[sl]


class _TokenLogprobs(torch.autograd.Function):
    """logits ``[N, V]`` -> ``(logprobs [N], entropy [N])``; backward recomputes softmax chunk by chunk."""

    @staticmethod
    def forward(ctx, logits, labels, valid, temperature, want_entropy, rows):
        ctx.set_materialize_grads(False)
        n, dtype = logits.shape[0], _compute_dtype(logits)
        lp = torch.zeros(n, dtype=dtype, device=logits.device)
        ent = torch.zeros_like(lp)
        lse = torch.zeros_like(lp)
        for s in range(0, n, rows):
            sl = slice(s, s + rows)
            z = _scaled_logits(logits[sl], valid[sl], temperature, dtype)
            lp[sl], ent_c, lse[sl] = _chunk_forward(z, labels[sl], valid[sl], want_entropy)
            if want_entropy:
                ent[sl] = ent_c
        ctx.save_for_backward(logits, labels, valid, lse, ent)
        ctx.temperature, ctx.want_entropy, ctx.rows = temperature, want_entropy, rows
        if not want_entropy:
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        logits, labels, valid, lse, ent = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 6
        grad = torch.empty_like(logits)
        dtype, rows = lse.dtype, ctx.rows
        g_ent = g_ent if ctx.want_entropy else None
        for s in range(0, logits.shape[0], rows):
            sl = slice(s, s + rows)
            z = _scaled_logits(logits[sl], valid[sl], ctx.temperature, dtype)
            grad[sl] = _chunk_grad(z, labels[sl], valid[sl], lse[sl], ent[sl], _part(g_lp, sl), _part(g_ent, sl),
                                   ctx.temperature)
        return grad, None, None, None, None, None


def token_logprobs(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False, chunk_size=None):
    """``logits [..., V]`` (fp32/bf16/fp16/fp64), ``labels [...]`` integer -> ``logprobs [...]`` fp32
    (and ``entropy [...]``): log softmax(logits / T)[label] and the entropy of softmax(logits / T).

    0.0 at ``labels == ignore_index`` with 0 gradient there. ``chunk_size`` = rows per chunk (default
    from V, see ``default_chunk_rows``); results do not depend on it beyond float rounding.
    """
    vocab = check_logits_labels(logits, labels)
    check_temperature(temperature)
    check_chunk_size(chunk_size)
    check_labels_in_range(labels, vocab, ignore_index)
    labels1d = labels.reshape(-1).long()
    valid = labels1d != ignore_index
    rows = chunk_size or default_chunk_rows(vocab)
    lp, ent = _TokenLogprobs.apply(logits.reshape(-1, vocab), labels1d, valid, float(temperature),
                                   return_entropy, rows)
    lp = lp.view(labels.shape)
    return (lp, ent.view(labels.shape)) if return_entropy else lp


def _chunk_logits(hidden, weight, bias, valid, temperature, dtype):
    """Scaled logits of one token chunk. Ignored rows are zeroed *before* the matmul so that NaN/inf
    there cannot reach the outputs or grad_weight (0 * nan = nan)."""
    h = hidden.masked_fill(~valid.unsqueeze(-1), 0)
    z = F.linear(h, weight, bias).to(dtype)
    return h, z.masked_fill_(~valid.unsqueeze(-1), 0).div_(temperature)


class _LinearTokenLogprobs(torch.autograd.Function):
    """hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]`` -> ``(logprobs [N], entropy [N])``.

    Forward keeps only ``lse`` and ``entropy`` per token; backward recomputes each chunk's logits, so
    extra memory is O(chunk * V) plus an fp32 grad_weight accumulator, independent of N.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, valid, temperature, want_entropy, rows):
        ctx.set_materialize_grads(False)
        n, dtype = hidden.shape[0], _compute_dtype(hidden)
        lp = torch.zeros(n, dtype=dtype, device=hidden.device)
        ent, lse = torch.zeros_like(lp), torch.zeros_like(lp)
        # autocast was applied to the inputs by the caller; off here so backward recomputes the same logits
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, rows):
                sl = slice(s, s + rows)
                _, z = _chunk_logits(hidden[sl], weight, bias, valid[sl], temperature, dtype)
                lp[sl], ent_c, lse[sl] = _chunk_forward(z, labels[sl], valid[sl], want_entropy)
                if want_entropy:
                    ent[sl] = ent_c
        ctx.save_for_backward(hidden, weight, bias, labels, valid, lse, ent)
        ctx.temperature, ctx.want_entropy, ctx.rows = temperature, want_entropy, rows
        if not want_entropy:
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, labels, valid, lse, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype, rows = lse.dtype, ctx.rows
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=dtype, device=weight.device) if need_b else None
        g_ent = g_ent if ctx.want_entropy else None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], rows):
                sl = slice(s, s + rows)
                h, z = _chunk_logits(hidden[sl], weight, bias, valid[sl], ctx.temperature, dtype)
                dz = _chunk_grad(z, labels[sl], valid[sl], lse[sl], ent[sl], _part(g_lp, sl), _part(g_ent, sl),
                                 ctx.temperature)
                if need_h:
                    grad_h[sl] = dz.to(weight.dtype) @ weight
                if need_w:
                    grad_w.addmm_(dz.t(), h.to(dtype))
                if need_b:
                    grad_b += dz.sum(0)
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


def linear_token_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, ignore_index=-100,
                          return_entropy=False, chunk_size=None):
    """``hidden [..., H]``, ``weight [V, H]``, ``labels [...]``, ``bias [V]`` -> same as
    ``token_logprobs(hidden @ weight.T + bias, labels, ...)`` (fp32 outputs), differentiable w.r.t.
    hidden, weight and bias, holding logits for at most ``chunk_size`` tokens at once
    (default ``default_chunk_rows(V)``). Under ``torch.autocast`` the inputs are cast to the autocast dtype
    first, as ``F.linear`` would do. Only rows with ``label != ignore_index`` are multiplied (compacted with
    ``index_select`` before chunking after one ``nonzero``, the call's only host sync; results scattered
    back, grad_hidden exactly 0 on ignored rows).
    """
    hidden, weight, bias = autocast_linear_inputs(hidden, weight, bias)
    _, vocab = check_linear_inputs(hidden, weight, labels, bias)
    check_temperature(temperature)
    check_chunk_size(chunk_size)
    check_labels_in_range(labels, vocab, ignore_index)
    labels1d = labels.reshape(-1).long()
    valid = labels1d != ignore_index
    rows = chunk_size or default_chunk_rows(vocab)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    n = hidden2d.shape[0]
    idx = valid_row_index(valid)  # padding skip (see _backend.valid_row_index): one host sync per call
    if idx is not None:  # only valid rows reach the matmuls; their gradient scatters back (0 elsewhere)
        hidden2d, labels1d, valid = hidden2d.index_select(0, idx), labels1d.index_select(0, idx), valid[idx]
    lp, ent = _LinearTokenLogprobs.apply(hidden2d, weight, bias, labels1d, valid, float(temperature),
                                         return_entropy, rows)
    lp, ent = scatter_rows(lp, idx, n), scatter_rows(ent, idx, n)
    lp = lp.view(labels.shape)
    return (lp, ent.view(labels.shape)) if return_entropy else lp


def gae(rewards, values, mask, *, gamma=1.0, lam=0.95):
    """Generalized Advantage Estimation (Schulman et al., 2016) over each row's valid tokens.

    ``rewards, values, mask [B, T]`` -> ``(advantages, returns)`` ``[B, T]`` fp32. Scanning each row
    backwards over its valid tokens only (holes skipped): ``delta_t = r_t + gamma V(next valid) - V_t``
    with V after the last valid token = 0, ``A_t = delta_t + gamma lam A(next valid)``,
    ``returns = A + V``; 0 at masked positions. Vectorised over B; a Python loop over T is fine for the
    reference (the Triton kernel is the fast path).
    """
    mask = check_gae_inputs(rewards, values, mask, gamma, lam)
    dtype = torch.float64 if torch.float64 in (rewards.dtype, values.dtype) else torch.float32
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    r = torch.where(mask, rewards.to(dtype), zero)
    v = torch.where(mask, values.to(dtype), zero)
    next_v = torch.zeros(rewards.shape[0], dtype=dtype, device=rewards.device)
    next_a = torch.zeros_like(next_v)
    adv = [None] * rewards.shape[1]
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        a = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * next_a
        adv[t] = torch.where(m, a, zero)
        next_v = torch.where(m, v[:, t], next_v)
        next_a = torch.where(m, a, next_a)
    advantages = torch.stack(adv, dim=1) if adv else torch.zeros_like(r)
    return advantages, torch.where(mask, advantages + v, zero)


# Labels at masked positions are replaced by this before computing log-probs (valid labels are >= 0).
_MASKED_LABEL = -100


def _ppo_objective(lp, ent, old_logprobs, advantages, mask, *, ref_logprobs, kl_coef, kl_kind, entropy_coef,
                   clip_low, clip_high, dual_clip, loss_agg, return_logprobs, log_ratio_clip=20.0):
    """policy loss + kl_coef * agg(KL estimate) - entropy_coef * agg(entropy), with their stats."""
    loss, stats = ppo_policy_loss(lp, old_logprobs, advantages, mask, clip_low=clip_low, clip_high=clip_high,
                                  dual_clip=dual_clip, loss_agg=loss_agg, log_ratio_clip=log_ratio_clip)
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    if ref_logprobs is not None:
        ref = torch.where(mask, ref_logprobs.to(lp.dtype), zero)  # lp is 0 there too: d = 0, no garbage
        kl = torch.where(mask, kl_estimate(lp, ref, kl_kind), zero)
        if kl_coef != 0:
            loss = loss + kl_coef * aggregate(kl, mask, loss_agg)
        stats["kl"] = masked_mean(kl.detach(), mask).float()
    else:
        stats["kl"] = torch.zeros((), dtype=torch.float32, device=lp.device)
    if entropy_coef != 0:
        loss = loss - entropy_coef * aggregate(ent, mask, loss_agg)
    stats["entropy"] = masked_mean(ent.detach(), mask).float()
    return (loss, stats, lp.detach()) if return_logprobs else (loss, stats)


def _masked_labels(labels, mask, vocab):
    """Labels of valid tokens must be in range; masked positions become ``_MASKED_LABEL`` (any garbage ok)."""
    check_labels_in_range(torch.where(mask, labels, 0), vocab, ignore_index=0)
    return torch.where(mask, labels, _MASKED_LABEL)


def fused_ppo_loss(hidden, weight, labels, old_logprobs, advantages, mask, *, ref_logprobs=None, kl_coef=0.0,
                   kl_kind="k3", entropy_coef=0.0, clip_low=0.2, clip_high=None, dual_clip=None, temperature=1.0,
                   loss_agg="token-mean", chunk_size=None, return_logprobs=False, log_ratio_clip=20.0):
    """PPO actor loss from ``hidden [B, T, H]`` and ``weight [V, H]`` (see API.md), chunked over tokens.

    = ppo_policy_loss(lp) + kl_coef * agg(kl_estimate(lp, ref, kl_kind)) - entropy_coef * agg(entropy),
    ``lp, entropy = linear_token_logprobs(hidden, weight, labels, return_entropy=True)`` at valid tokens.
    Returns ``(loss, stats)`` or ``(loss, stats, logprobs.detach())``; stats: clipfrac, approx_kl,
    ratio_mean, kl (0 without ref_logprobs), entropy. Masked tokens never reach the matmuls (the padding
    skip of ``linear_token_logprobs``).
    """
    hidden, weight, _ = autocast_linear_inputs(hidden, weight)
    _, vocab = check_linear_inputs(hidden, weight, labels)
    mask = check_ppo_inputs(labels.shape, "labels", old_logprobs, advantages, mask, ref_logprobs=ref_logprobs,
                            kl_coef=kl_coef, kl_kind=kl_kind, loss_agg=loss_agg, clip_low=clip_low,
                            clip_high=clip_high, dual_clip=dual_clip)
    lp, ent = linear_token_logprobs(hidden, weight, _masked_labels(labels, mask, vocab), temperature=temperature,
                                    ignore_index=_MASKED_LABEL, return_entropy=True, chunk_size=chunk_size)
    return _ppo_objective(lp, ent, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, kl_coef=kl_coef,
                          kl_kind=kl_kind, entropy_coef=entropy_coef, clip_low=clip_low, clip_high=clip_high,
                          dual_clip=dual_clip, loss_agg=loss_agg, return_logprobs=return_logprobs,
                          log_ratio_clip=log_ratio_clip)


def fused_ppo_loss_from_logits(logits, labels, old_logprobs, advantages, mask, *, ref_logprobs=None, kl_coef=0.0,
                               kl_kind="k3", entropy_coef=0.0, clip_low=0.2, clip_high=None, dual_clip=None,
                               temperature=1.0, loss_agg="token-mean", return_logprobs=False, chunk_size=None,
                               log_ratio_clip=20.0):
    """Same as ``fused_ppo_loss`` with ``logits [B, T, V]`` given; processed in chunks of ``chunk_size`` rows."""
    vocab = check_logits_labels(logits, labels)
    mask = check_ppo_inputs(labels.shape, "labels", old_logprobs, advantages, mask, ref_logprobs=ref_logprobs,
                            kl_coef=kl_coef, kl_kind=kl_kind, loss_agg=loss_agg, clip_low=clip_low,
                            clip_high=clip_high, dual_clip=dual_clip)
    lp, ent = token_logprobs(logits, _masked_labels(labels, mask, vocab), temperature=temperature,
                             ignore_index=_MASKED_LABEL, return_entropy=True, chunk_size=chunk_size)
    return _ppo_objective(lp, ent, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, kl_coef=kl_coef,
                          kl_kind=kl_kind, entropy_coef=entropy_coef, clip_low=clip_low, clip_high=clip_high,
                          dual_clip=dual_clip, loss_agg=loss_agg, return_logprobs=return_logprobs,
                          log_ratio_clip=log_ratio_clip)
