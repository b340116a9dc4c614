"""linear_token_logprobs: token log-probs (and entropy) from hidden states and an lm_head, no [N, V] logits.

Triton path: chunked over tokens around cuBLAS. Forward: per chunk, logits = h @ W.T (+ b) in the input
dtype, then the row kernel of ``logprobs.py`` (lp, entropy, lse). Backward: per chunk, recompute the
logits, the row kernel overwrites them with dlogits, then grad_h = dlogits @ W, grad_W += dlogits.T @ h
(into an fp32 accumulator, cast to the weight dtype once at the end), grad_b += sum dlogits. Extra
memory: one chunk of logits whatever the number of tokens, plus the fp32 grad_W accumulator.

Chunk rows (``chunk_rows``): a multiple of 256 (cuBLAS's 128/256-row M tiles: no ragged tile per chunk)
and at least max(2048, 2 * SMs * 128 * 256 / H), so the grad_h GEMM ([rows, V] @ [V, H], output tiles of
128 x 256) has two full waves on every SM; capped so one chunk of logits stays under ``_CHUNK_BUDGET``.
Fewer, larger chunks also mean fewer grad_W updates.

grad_W precision and traffic: summing 32 chunk products into a bf16 grad_W rounds 32 times (~4x the
error of one eager bf16 GEMM over all tokens). Two backwards round grad_W once:
- token chunks with an fp32 accumulator (cuBLAS ``addmm`` with ``out_dtype=float32``, cast once):
  extra memory 4 V H bytes, traffic 8 V H bytes per chunk (read + write of the accumulator);
- vocabulary slabs (``Variant(grad_w="vocab")``): per slab of Vc columns, recompute Z_c = h W_c^T for all
  N tokens, dZ_c from the saved lse / entropy (the same backward row kernel: labels shifted by the slab
  start), grad_W[c] = dZ_c^T h written once (K = N inside one GEMM), grad_h += dZ_c W_c into an fp32
  [N, H] accumulator: extra memory 4 N H bytes, traffic 8 N H bytes per slab.
With chunks and slabs both sized to the same logits budget, slabs move N / V times the bytes of chunks and
hold N / V times the extra memory. ``grad_w="auto"`` (the default) therefore takes slabs when N <= V
(RLHF micro-batches: 8-32k tokens against 128-152k vocabularies) and token chunks otherwise, and always
token chunks when the caller gives ``chunk_size`` (the API promises no more than that many tokens' logits
at once). ``fused_ppo_loss`` computes its gradient during the token-chunked forward: fp32 accumulator.
Round 1's bf16 accumulation stays selectable (``Variant(grad_w="weight")``) for the GPU timing.

Padding skip (issue 11): only valid rows (label != ignore_index) reach a GEMM. Before chunking, one
``nonzero`` over the validity mask (the call's only host sync: the count sizes the compacted batch, then
every chunk / slab bound is a Python int) gives the valid rows' indices; hidden and labels are compacted
with ``index_select`` (one [n_valid, H] copy, skipped when every row is valid), the Function runs on the
n_valid rows (``backward_mode`` decides N <= V on n_valid), and lp / entropy scatter back with
``index_copy`` into zeros. grad_hidden is ``index_select``'s backward: the valid rows' gradients at their
positions, exactly 0 at ignored ones. GEMM work scales with valid tokens: at 50% padding, half the FLOPs.
"""
from __future__ import annotations

import functools

import torch

from . import reference
from ._parity import ensure_parity
from ._backend import (autocast_linear_inputs, check_chunk_size, check_labels_in_range, check_linear_inputs,
                       check_temperature, resolve_backend, scatter_rows, valid_row_index)
from ._triton_utils import CURRENT, Variant, autocast_inputs, check_launchable, reject_float64, rows_3d
from .logprobs import logprobs_backward, logprobs_forward

# Round 1's chunk: about this many bytes of logits (256 MB: 860 tokens at V = 151936 in bf16).
_CHUNK_BYTES = 1 << 28
# Round 2's cap on one chunk of logits in the input dtype (1 GiB: 3328 rows at V = 151936 in bf16).
_CHUNK_BUDGET = 1 << 30
_M_TILE = 256  # chunk rows are a multiple of this (cuBLAS M tiles of 128 or 256)


def default_chunk_rows(vocab: int, itemsize: int) -> int:
    """Round 1 (``Variant(chunk="bytes")``): rows so one chunk's logits take ~``_CHUNK_BYTES`` (16 to 8192)."""
    return max(16, min(8192, _CHUNK_BYTES // (vocab * itemsize)))


def chunk_rows(vocab: int, hidden_size: int, itemsize: int, sm_count: int,
               budget_bytes: int = _CHUNK_BUDGET) -> int:
    """Tokens per chunk: a multiple of 256, >= max(2048, 2 * sm_count * 128 * 256 / H) (two waves of
    128 x 256 output tiles in the grad_h GEMM), capped so the chunk's logits fit ``budget_bytes``
    (at least 256 rows). Independent of the number of tokens."""
    want = max(2048, 2 * sm_count * 128 * 256 // max(hidden_size, 1))
    want = -(-want // _M_TILE) * _M_TILE
    cap = budget_bytes // (vocab * itemsize) // _M_TILE * _M_TILE
    return max(_M_TILE, min(want, cap))


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (CPU: the interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def resolve_chunk_rows(chunk_size: int | None, weight: torch.Tensor, variant: Variant = CURRENT) -> int:
    """``chunk_size`` when given, else the default of ``variant.chunk`` for this lm_head and device."""
    if chunk_size:
        return chunk_size
    vocab, h = weight.shape
    if variant.chunk == "bytes":
        return default_chunk_rows(vocab, weight.element_size())
    return chunk_rows(vocab, h, weight.element_size(), sm_count(weight.device))


def grad_w_buffer(weight: torch.Tensor, variant: Variant = CURRENT) -> torch.Tensor:
    """Zeroed grad_W accumulator over token chunks: the weight dtype for round 1 (``grad_w == "weight"``),
    else fp32."""
    dtype = weight.dtype if variant.grad_w == "weight" else torch.float32
    return torch.zeros(weight.shape, dtype=dtype, device=weight.device)


def vocab_slab(n_tokens: int, vocab: int, itemsize: int, budget_bytes: int = _CHUNK_BUDGET) -> int:
    """Vocabulary columns per slab of the vocabulary-split backward: the [N, Vc] logits fit
    ``budget_bytes``, Vc a multiple of 256 (at least 256, at most V)."""
    cols = budget_bytes // (max(n_tokens, 1) * itemsize) // _M_TILE * _M_TILE
    return min(vocab, max(_M_TILE, cols))


def backward_mode(variant: Variant, n_tokens: int, vocab: int, chunk_size: int | None) -> Variant:
    """Resolve ``grad_w="auto"``: vocabulary slabs when N <= V and no ``chunk_size`` was asked for, else
    token chunks with an fp32 accumulator (see the module docstring)."""
    if variant.grad_w != "auto":
        return variant
    return variant._replace(grad_w="vocab" if chunk_size is None and n_tokens <= vocab else "fp32")


def accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with the products summed in ``acc``'s dtype (fp32 for an fp32 accumulator).

    CUDA: one cuBLAS GEMM reading bf16/fp16 operands and adding into fp32 (``addmm`` with
    ``out_dtype``, torch >= 2.8). Elsewhere (CPU, older torch): the operands upcast first (same sums).
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and _mixed_addmm_works(str(acc.device), a.dtype, acc.dtype):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


@functools.lru_cache(maxsize=None)
def _mixed_addmm_works(device: str, dtype: torch.dtype, acc_dtype: torch.dtype) -> bool:
    """Whether ``addmm(acc, a, b, out_dtype=acc.dtype, out=acc)`` exists here and adds into ``acc`` (checked
    once per device and dtype pair on a 64 x 64 product against the upcast computation; torch < 2.8 has
    no such overload)."""
    if not hasattr(torch.ops.aten.addmm, "dtype_out"):
        return False
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(64, 64, device=device, generator=g).to(dtype) for _ in range(2))
    acc = torch.randn(64, 64, device=device, generator=g).to(acc_dtype)
    want = acc + a.to(acc_dtype) @ b.to(acc_dtype)
    try:
        torch.addmm(acc, a, b, out_dtype=acc_dtype, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return bool(torch.allclose(acc, want, rtol=1e-3, atol=1e-3))


def chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, valid: torch.Tensor):
    """``h [n, H]``, ``valid [n]`` -> ``(h0, logits [n, V])`` in the input dtype, ``h0`` = ``h`` with ignored
    rows zeroed: garbage (NaN/inf) there would reach grad_W through dlogits.T @ h (0 * NaN = NaN)."""
    h0 = h.masked_fill(~valid.unsqueeze(-1), 0)
    logits = h0 @ weight.t() if bias is None else torch.addmm(bias, h0, weight.t())
    return h0, logits


class LinearTokenLogprobsFunction(torch.autograd.Function):
    """hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]`` -> ``(lp [N], ent [N])`` fp32, token chunks."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, ignore_index, want_entropy, rows, variant):
        n = hidden.shape[0]
        lp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        ent = torch.empty_like(lp) if want_entropy else torch.zeros_like(lp)
        lse = torch.empty_like(lp)
        for s in range(0, n, rows):
            sl = slice(s, s + rows)
            _, z = chunk_logits(hidden[sl], weight, bias, labels[sl] != ignore_index)
            out = (lp[sl], ent[sl], lse[sl])
            logprobs_forward(rows_3d(z), labels[sl], temperature, ignore_index, want_entropy, out=out,
                             variant=variant)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, ent)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        ctx.want_entropy, ctx.rows, ctx.variant = want_entropy, rows, variant
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
        if ctx.variant.grad_w == "vocab":
            return LinearTokenLogprobsFunction._backward_vocab(ctx, g_lp, g_ent)
        hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp
        g_ent = g_ent if ctx.want_entropy else None
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        grad_w = grad_w_buffer(weight, ctx.variant) if need_w else None  # fp32: see the module docstring
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
                accumulate_mm(grad_w, z.t(), h0)
            if need_b:
                grad_b += z.sum(0, dtype=torch.float32)
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None

    @staticmethod
    def _backward_vocab(ctx, g_lp, g_ent):
        """Vocabulary-split backward (module docstring): one [N, Vc] slab of logits at a time."""
        hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, vocab = hidden.shape[0], weight.shape[0]
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp
        g_ent = g_ent if ctx.want_entropy else None
        valid = labels != ctx.ignore_index
        h0 = hidden.masked_fill(~valid.unsqueeze(-1), 0)  # garbage in ignored rows must not reach grad_W
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty(vocab, dtype=torch.float32, device=weight.device) if need_b else None
        cols = vocab_slab(n, vocab, weight.element_size())
        for v0 in range(0, vocab, cols):
            vs = slice(v0, v0 + cols)
            w_c = weight[vs]
            z = h0 @ w_c.t() if bias is None else torch.addmm(bias[vs], h0, w_c.t())
            # labels relative to the slab; vocab marks ignored rows (no shifted label can equal it)
            lab_c = torch.where(valid, labels - v0, vocab)
            z3 = rows_3d(z)
            logprobs_backward(z3, z3, lab_c, lse, ent, g_lp, g_ent, ctx.temperature, vocab)
            if need_w:
                torch.mm(z.t(), h0, out=grad_w[vs])
            if need_h:
                accumulate_mm(grad_h, z, w_c)
            if need_b:
                grad_b[vs] = z.sum(0, dtype=torch.float32)
        grad_h = grad_h.to(hidden.dtype) if need_h else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def _linear_token_logprobs_triton(hidden, weight, labels, bias, temperature, ignore_index, return_entropy,
                                  chunk_size, variant: Variant = CURRENT):
    """The Triton path without input validation (``variant``: internal, for timing old against new)."""
    check_launchable("linear_token_logprobs", hidden, weight, labels, bias)
    reject_float64("linear_token_logprobs", hidden=hidden)
    hidden, weight, bias = autocast_inputs(hidden.device, hidden, weight, bias)
    rows = resolve_chunk_rows(chunk_size, weight, variant)
    labels1d = labels.reshape(-1).long().contiguous()
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    n = hidden2d.shape[0]
    idx = valid_row_index(labels1d != ignore_index)  # padding skip: the one host sync of the call
    if idx is not None:  # only valid rows reach the GEMMs; their gradient scatters back (0 elsewhere)
        hidden2d, labels1d = hidden2d.index_select(0, idx), labels1d.index_select(0, idx)
    variant = backward_mode(variant, hidden2d.shape[0], weight.shape[0], chunk_size)
    with torch.autocast(hidden.device.type, enabled=False):
        lp, ent = LinearTokenLogprobsFunction.apply(hidden2d, weight, bias, labels1d, float(temperature),
                                                    int(ignore_index), return_entropy, rows, variant)
    lp, ent = scatter_rows(lp, idx, n), scatter_rows(ent, idx, n)
    lp = lp.view(labels.shape)
    return (lp, ent.view(labels.shape)) if return_entropy else lp


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0,
                          ignore_index: int = -100, return_entropy: bool = False,
                          chunk_size: int | None = None, backend: str = "auto"):
    """``hidden [..., H]``, ``weight [V, H]``, ``labels [...]``, ``bias [V]`` -> same as
    ``token_logprobs(hidden @ weight.T + bias, labels, ...)`` (fp32 ``[...]``), differentiable w.r.t.
    hidden, weight and bias, holding logits for at most ``chunk_size`` tokens at once (Triton default:
    ``chunk_rows``, a multiple of 256 sized to the GPU, <= 1 GiB of logits; the backward then splits the
    vocabulary instead when N <= V, with the same 1 GiB bound: see the module docstring). Matmuls run in the input dtype. ``backend="auto"``: Triton
    on CUDA (and on CPU under ``TRITON_INTERPRET=1``), except float64 inputs (PyTorch path).

    Padding is skipped (both paths): only rows with ``label != ignore_index`` are multiplied by ``weight``
    (compacted with ``index_select`` before chunking, results scattered back), so the GEMMs cost
    ``6 * n_valid * H * V`` FLOPs fwd + bwd whatever the padding. Outputs and gradients are those of the
    full computation: 0 at ignored positions, grad_hidden exactly 0 on ignored rows (NaN/inf there are never
    read by a GEMM). Cost: one host sync per call (``nonzero`` learns the valid count; none per chunk) and
    one ``[n_valid, H]`` copy of hidden when some row is ignored.
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
    ensure_parity(hidden.device)
    return _linear_token_logprobs_triton(hidden, weight, labels, bias, temperature, ignore_index,
                                         return_entropy, chunk_size)
