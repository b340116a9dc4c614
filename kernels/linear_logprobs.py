"""linear_token_logprobs: token log-probs (and entropy) from hidden states and an lm_head, no [N, V] logits.

Triton path: chunked over tokens around cuBLAS. Forward: per chunk, logits = h @ W.T (+ b) in the input
dtype, then the row kernel of ``logprobs.py`` (lp, entropy, lse). Backward: per chunk, recompute the
logits, the row kernel overwrites them with dlogits, then grad_h = dlogits @ W, grad_W += dlogits.T @ h,
grad_b += sum dlogits. Extra memory: one chunk of logits, whatever the number of tokens.
"""
from __future__ import annotations

import torch

from . import reference
from ._backend import (autocast_linear_inputs, check_chunk_size, check_labels_in_range, check_linear_inputs,
                       check_temperature, resolve_backend)
from ._triton_utils import autocast_inputs, check_launchable, reject_float64, rows_3d
from .logprobs import logprobs_backward, logprobs_forward

# One chunk of logits takes about this many bytes in the input dtype (256 MB: 860 tokens at V = 151936
# in bf16), enough rows for cuBLAS to run the chunk matmuls near its peak rate.
_CHUNK_BYTES = 1 << 28


def default_chunk_rows(vocab: int, itemsize: int) -> int:
    """Tokens per chunk so one chunk's logits take ~``_CHUNK_BYTES`` (16 to 8192; independent of N)."""
    return max(16, min(8192, _CHUNK_BYTES // (vocab * itemsize)))


def chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, valid: torch.Tensor):
    """``h [n, H]``, ``valid [n]`` -> ``(h0, logits [n, V])`` in the input dtype, ``h0`` = ``h`` with ignored
    rows zeroed: garbage (NaN/inf) there would reach grad_W through dlogits.T @ h (0 * NaN = NaN)."""
    h0 = h.masked_fill(~valid.unsqueeze(-1), 0)
    logits = h0 @ weight.t() if bias is None else torch.addmm(bias, h0, weight.t())
    return h0, logits


class LinearTokenLogprobsFunction(torch.autograd.Function):
    """hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]`` -> ``(lp [N], ent [N])`` fp32, token chunks."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, want_entropy, rows):
        n = hidden.shape[0]
        lp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        ent = torch.empty_like(lp) if want_entropy else torch.zeros_like(lp)
        lse = torch.empty_like(lp)
        for s in range(0, n, rows):
            sl = slice(s, s + rows)
            _, z = chunk_logits(hidden[sl], weight, bias, labels[sl] != ignore_index)
            out = (lp[sl], ent[sl], lse[sl])
            logprobs_forward(rows_3d(z), labels[sl], temperature, ignore_index, want_entropy, out=out)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, ent)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        ctx.want_entropy, ctx.rows = want_entropy, rows
        ctx.set_materialize_grads(False)
        if not want_entropy:
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden = ctx.saved_tensors[0]
        with torch.autocast(hidden.device.type, enabled=False):  # matmuls in the saved inputs' dtype
            return LinearTokenLogprobsFunction._backward(ctx, g_lp, g_ent)

    @staticmethod
    def _backward(ctx, g_lp, g_ent):
        hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp
        g_ent = g_ent if ctx.want_entropy else None
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        # grad_W accumulates in the weight dtype (cuBLAS adds in fp32 and rounds once per chunk), as
        # Liger-Kernel does: an fp32 [V, H] accumulator would cost more than the chunk matmuls save.
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for s in range(0, hidden.shape[0], ctx.rows):
            sl = slice(s, s + ctx.rows)
            h0, z = chunk_logits(hidden[sl], weight, bias, labels[sl] != ctx.ignore_index)
            z3 = rows_3d(z)
            logprobs_backward(z3, z3, labels[sl], lse[sl], ent[sl], g_lp[sl],
                              None if g_ent is None else g_ent[sl], ctx.temperature, ctx.ignore_index)
            if need_h:
                torch.mm(z, weight, out=grad_h[sl])
            if need_w:
                grad_w.addmm_(z.t(), h0)
            if need_b:
                grad_b += z.sum(0, dtype=torch.float32)
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _linear_token_logprobs_triton(hidden, weight, labels, bias, temperature, ignore_index, return_entropy,
                                  chunk_size):
    check_launchable("linear_token_logprobs", hidden, weight, labels, bias)
    reject_float64("linear_token_logprobs", hidden=hidden)
    hidden, weight, bias = autocast_inputs(hidden.device, hidden, weight, bias)
    rows = chunk_size or default_chunk_rows(weight.shape[0], weight.element_size())
    labels1d = labels.reshape(-1).long().contiguous()
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    with torch.autocast(hidden.device.type, enabled=False):
        lp, ent = LinearTokenLogprobsFunction.apply(hidden2d, weight, bias, labels1d, float(temperature),
                                                    int(ignore_index), return_entropy, rows)
    lp = lp.view(labels.shape)
    return (lp, ent.view(labels.shape)) if return_entropy else lp


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0,
                          ignore_index: int = -100, return_entropy: bool = False,
                          chunk_size: int | None = None, backend: str = "auto"):
    """``hidden [..., H]``, ``weight [V, H]``, ``labels [...]``, ``bias [V]`` -> same as
    ``token_logprobs(hidden @ weight.T + bias, labels, ...)`` (fp32 ``[...]``), differentiable w.r.t.
    hidden, weight and bias, holding logits for at most ``chunk_size`` tokens at once (Triton default:
    ~256 MB of logits, ``default_chunk_rows``). Matmuls run in the input dtype. ``backend="auto"``: Triton
    on CUDA (and on CPU under ``TRITON_INTERPRET=1``), except float64 inputs (PyTorch path).
    """
    hidden, weight, bias = autocast_linear_inputs(hidden, weight, bias)  # as F.linear: bf16 h, fp32 W is fine
    _, vocab = check_linear_inputs(hidden, weight, labels, bias)
    check_temperature(temperature)
    check_chunk_size(chunk_size)
    chosen = resolve_backend(backend, hidden)
    if chosen == "torch" or (backend == "auto" and hidden.dtype == torch.float64):
        return reference.linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                               ignore_index=ignore_index, return_entropy=return_entropy,
                                               chunk_size=chunk_size)
    check_labels_in_range(labels, vocab, ignore_index)
    return _linear_token_logprobs_triton(hidden, weight, labels, bias, temperature, ignore_index,
                                         return_entropy, chunk_size)
