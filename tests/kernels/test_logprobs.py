"""token_logprobs, Triton path (interpreter on CPU): against the PyTorch reference run in float64.

Tolerances (fp32 math inside the kernel; inputs of every dtype are compared with the oracle on the same,
exactly upcast values, so the only differences are fp32 rounding and the rounding of dlogits to the
logits dtype):
- logprobs / entropy: atol 2e-5 + rtol 1e-5 (|lp| up to ~1e4 / T for the extreme rows);
- dlogits: fp32 atol 2e-6; bf16 / fp16 atol = 2 ulp of the largest |grad| (2^-7 / 2^-10 relative).
"""
from __future__ import annotations

import pytest
import torch

from fastrlhf.kernels import reference, token_logprobs
from fastrlhf.kernels._triton_utils import interpreter_unavailable_reason

GRAD_ATOL_REL = {torch.float32: 1e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def _oracle(logits, labels, g_lp, g_ent, **kw):
    """Reference outputs and dlogits in float64 from the same (exactly upcast) logits."""
    x = logits.detach().double().requires_grad_(True)
    lp, ent = reference.token_logprobs(x, labels, return_entropy=True, **kw)
    (lp * g_lp.double() + ent * g_ent.double()).sum().backward()
    return lp.detach(), ent.detach(), x.grad


def _triton(logits, labels, g_lp, g_ent, **kw):
    x = logits.detach().clone().requires_grad_(True)
    lp, ent = token_logprobs(x, labels, return_entropy=True, backend="triton", **kw)
    (lp * g_lp + ent * g_ent).sum().backward()
    return lp.detach(), ent.detach(), x.grad


def _assert_close(got, want, dtype=torch.float32):
    lp, ent, grad = got
    lp0, ent0, grad0 = want
    assert lp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(lp.double(), lp0, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ent0, atol=2e-5, rtol=1e-5)
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    atol = GRAD_ATOL_REL[dtype] * max(grad0.abs().max().item(), 1e-3)
    torch.testing.assert_close(grad.double(), grad0, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["ragged", "left"])
def test_matches_float64_reference(interpret, dtype, kind, make_mask, garbage):
    """(3, 37, 1031) logits as a strided slice of (3, 38, 1031), ignored rows hold NaN/inf garbage,
    temperature 0.7, non-unit upstream grads on both outputs."""
    g = torch.Generator().manual_seed(1)
    B, T, V = 3, 37, 1031
    mask = make_mask(B, T, kind)
    full = (torch.randn(B, T + 1, V, generator=g) * 4).to(dtype)
    full[:, :-1] = garbage(full[:, :-1], mask)
    logits = full[:, :-1]  # not viewable as [N, V]: the kernel must address rows by strides
    labels = torch.where(mask, torch.randint(0, V, (B, T), generator=g), -100)
    g_lp, g_ent = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    got = _triton(logits, labels, g_lp, g_ent, temperature=0.7)
    _assert_close(got, _oracle(logits, labels, g_lp, g_ent, temperature=0.7), dtype)
    assert (got[0][~mask] == 0).all() and (got[1][~mask] == 0).all() and (got[2][~mask] == 0).all()


def test_multi_block_extreme_and_neg_inf(interpret):
    """V spans three 8192-wide blocks: max in the last block, a first block all -inf, |x| ~ 1e4,
    -inf entries (also at no label), a one-hot-like row with entropy ~ 0."""
    g = torch.Generator().manual_seed(2)
    V = 2 * 8192 + 37
    logits = torch.randn(6, V, generator=g) * 2
    logits[0, -5] = 40.0                       # max in the last (partial) block
    logits[1, :8192] = float("-inf")           # whole first block -inf
    logits[2] *= 5000.0                        # |x| ~ 1e4
    logits[3, ::3] = float("-inf")             # scattered -inf
    logits[4, 7] = 1e4                         # one-hot: entropy ~ 0, p = 1 at the label
    logits[5] = 0.0                            # uniform: entropy = log V
    labels = torch.tensor([V - 5, 8200, 11, 1, 7, 3])
    g_lp, g_ent = torch.randn(6, generator=g), torch.randn(6, generator=g)
    got = _triton(logits, labels, g_lp, g_ent, temperature=1.3)
    _assert_close(got, _oracle(logits, labels, g_lp, g_ent, temperature=1.3))
    assert got[1][5].item() == pytest.approx(torch.log(torch.tensor(float(V))).item(), rel=1e-6)
    assert abs(got[1][4].item()) < 1e-6


def test_logprobs_only_and_entropy_only_grads(interpret, make_mask):
    """Without return_entropy the entropy term is skipped; a loss on the entropy alone still flows."""
    g = torch.Generator().manual_seed(3)
    B, T, V = 2, 11, 517
    mask = make_mask(B, T, "holes", empty_rows=False)
    logits = torch.randn(B, T, V, generator=g)
    labels = torch.where(mask, torch.randint(0, V, (B, T), generator=g), -7)
    w = torch.randn(B, T, generator=g)
    x = logits.clone().requires_grad_(True)
    lp = token_logprobs(x, labels, ignore_index=-7, backend="triton")
    (lp * w).sum().backward()
    _, _, want = _oracle(logits, labels, w, torch.zeros(B, T), ignore_index=-7)
    torch.testing.assert_close(x.grad.double(), want, atol=1e-6, rtol=0)
    x.grad = None
    _, ent = token_logprobs(x, labels, ignore_index=-7, return_entropy=True, backend="triton")
    (ent * w).sum().backward()
    _, _, want = _oracle(logits, labels, torch.zeros(B, T), w, ignore_index=-7)
    torch.testing.assert_close(x.grad.double(), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(29,), (2, 3, 4, 5)])
def test_other_ranks(interpret, shape):
    """[V] with a 0-dim label and [2, 3, 4, V]: outputs keep labels' shape."""
    g = torch.Generator().manual_seed(4)
    V = 301
    logits = torch.randn(*shape[:-1], V, generator=g)
    labels = torch.randint(0, V, shape[:-1], generator=g)
    g_lp, g_ent = torch.randn(shape[:-1], generator=g), torch.randn(shape[:-1], generator=g)
    got = _triton(logits, labels, g_lp, g_ent)
    assert got[0].shape == labels.shape and got[2].shape == logits.shape
    _assert_close(got, _oracle(logits, labels, g_lp, g_ent))


def _graph_names(t, depth=3):
    """Names of the autograd nodes within ``depth`` steps of ``t``."""
    names, frontier = [], [t.grad_fn]
    for _ in range(depth):
        frontier = [f for f in frontier if f is not None]
        names += [f.name() for f in frontier]
        frontier = [g for f in frontier for g, _ in f.next_functions]
    return " ".join(names)


def test_auto_picks_triton_only_under_interpreter(interpret, monkeypatch):
    logits = torch.randn(4, 33, requires_grad=True)
    labels = torch.tensor([0, 5, -100, 32])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ref = token_logprobs(logits, labels)
    assert "TokenLogprobsFunction" not in _graph_names(ref)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        token_logprobs(logits, labels, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = token_logprobs(logits, labels)
    assert "TokenLogprobsFunction" in _graph_names(out)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_interpreter_that_cannot_run_gives_a_clear_error(monkeypatch):
    """triton < 3.7 with numpy >= 2.4 (the GPU machine's pair): a named reason, not a numpy TypeError."""
    import numpy
    import triton
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.5.0")
    assert "triton-lang/triton#9171" in interpreter_unavailable_reason()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1 is set but .*#9171.*backend='torch'"):
        token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]), backend="triton")
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    assert interpreter_unavailable_reason() is None


def test_bad_inputs(interpret):
    logits = torch.randn(3, 10)
    with pytest.raises(ValueError, match=r"labels\[1\] = 10"):
        token_logprobs(logits, torch.tensor([0, 10, 2]), backend="triton")
    with pytest.raises(ValueError, match="labels must have shape"):
        token_logprobs(logits, torch.tensor([0, 1]), backend="triton")
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, torch.tensor([0, 1, 2]), temperature=0.0, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        token_logprobs(logits.double(), torch.tensor([0, 1, 2]), backend="triton")
    # auto sends float64 to the reference (the oracle) instead
    out = token_logprobs(logits.double(), torch.tensor([0, 1, 2]))
    assert out.dtype == torch.float64


def test_no_float32_copy_of_logits(interpret, float_guard):
    """bf16 logits: forward + backward create no float32 tensor of N x V elements (only [N] vectors)."""
    logits = torch.randn(16, 700).bfloat16().requires_grad_(True)
    labels = torch.randint(0, 700, (16,))
    with float_guard() as guard:
        lp, ent = token_logprobs(logits, labels, return_entropy=True, backend="triton")
        (lp + ent).sum().backward()
    assert guard.largest <= 16 and logits.grad.dtype == torch.bfloat16


def test_kernels_compile_for_sm90():
    """The compiled (non-interpreter) path: both row kernels build to a cubin for sm90 without a GPU."""
    pytest.importorskip("triton.backends.nvidia")
    import sys

    from fastrlhf.kernels._triton_utils import compile_for_cuda
    mod = sys.modules["fastrlhf.kernels.logprobs"]
    row = {"stride_xa": "i64", "stride_xr": "i64", "R": "i32", "labels_ptr": "*i64"}
    scal = {"V": "i32", "inv_temp": "fp32", "ignore_index": "i32"}
    for flag in (True, False):
        for align in (1, 8):
            compile_for_cuda(mod._logprobs_fwd_lanes_kernel, {
                "x_ptr": "*bf16", **row, "lp_ptr": "*fp32", "ent_ptr": "*fp32", "lse_ptr": "*fp32", **scal},
                {"HAS_ENTROPY": flag, "BLOCK_V": 2048, "ALIGN": align}, num_warps=8)
        compile_for_cuda(mod._logprobs_fwd_kernel, {
            "x_ptr": "*bf16", **row, "lp_ptr": "*fp32", "ent_ptr": "*fp32", "lse_ptr": "*fp32", **scal},
            {"HAS_ENTROPY": flag, "BLOCK_V": 8192}, num_warps=16)
        compile_for_cuda(mod._logprobs_bwd_kernel, {
            "x_ptr": "*bf16", "stride_xa": "i64", "stride_xr": "i64", "R": "i32", "dx_ptr": "*bf16",
            "stride_da": "i64", "stride_dr": "i64", "labels_ptr": "*i64", "lse_ptr": "*fp32",
            "ent_ptr": "*fp32",
            "g_lp_ptr": "*fp32", "g_ent_ptr": "*fp32", **scal}, {"HAS_ENT_GRAD": flag, "BLOCK_V": 8192},
            num_warps=16)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lanes_kernel_odd_vocab_heads_tails_and_misaligned_base(interpret, dtype):
    """Round 2's row kernel: V = 4099 (odd: every row starts at a different 16-byte offset, so the head
    length varies per row; two full 2048-lane tiles and a tail), a view starting one element in (storage
    not 16-byte aligned: no head), -inf runs, entropy on and off: against float64 and the round-1 kernel."""
    from fastrlhf.kernels._triton_utils import ROUND1
    from fastrlhf.kernels.logprobs import _token_logprobs_triton
    g = torch.Generator().manual_seed(6)
    B, T, V = 2, 5, 4099
    full = (torch.randn(B, T, V + 1, generator=g) * 3).to(dtype)
    full[0, 1, :3000] = float("-inf")  # head and first tile all -inf
    full[1, 2, ::2] = float("-inf")
    full[1, 3, -1] = 30.0  # max in the tail
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 4] = -100
    g_lp, g_ent = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    for logits in (full[..., :V], full[..., 1:]):
        got = _triton(logits, labels, g_lp, g_ent, temperature=0.8)
        _assert_close(got, _oracle(logits, labels, g_lp, g_ent, temperature=0.8), dtype)
        lp1, ent1 = _token_logprobs_triton(logits, labels, 0.8, -100, True, ROUND1)
        torch.testing.assert_close(got[0], lp1, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], ent1, atol=2e-5, rtol=1e-5)
        lp_only = token_logprobs(logits, labels, temperature=0.8, backend="triton")
        torch.testing.assert_close(lp_only, got[0], atol=1e-5, rtol=1e-6)


def test_lanes_kernel_vectorizes_unaligned_rows_for_sm90():
    """Compiled for sm90 with a 16-byte aligned base and strides of unknown alignment (V = 151665 or
    50257): the body of the round-2 row kernel loads 16-byte vectors; round 1's kernel cannot."""
    pytest.importorskip("triton.backends.nvidia")
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    import sys
    mod = sys.modules["fastrlhf.kernels.logprobs"]

    def vector_loads(kernel, dtype, constexprs, warps):
        fn = triton.runtime.jit.JITFunction(kernel.fn)
        sig = {"x_ptr": f"*{dtype}", "stride_xa": "i64", "stride_xr": "i64", "R": "i32", "labels_ptr": "*i64",
               "lp_ptr": "*fp32", "ent_ptr": "*fp32", "lse_ptr": "*fp32", "V": "i32", "inv_temp": "fp32",
               "ignore_index": "i32", **{k: "constexpr" for k in constexprs}}
        src = ASTSource(fn, {a: sig[a] for a in fn.arg_names}, constexprs,
                        attrs={(fn.arg_names.index("x_ptr"),): [["tt.divisibility", 16]]})
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]
        return len(re.findall(r"ld\.global[^\n;]*\.v4", ptx))

    for dtype, align in (("bf16", 8), ("fp32", 4)):
        for ent in (True, False):
            assert vector_loads(mod._logprobs_fwd_lanes_kernel, dtype,
                                {"HAS_ENTROPY": ent, "BLOCK_V": 2048, "ALIGN": align}, 8) >= 1
    assert vector_loads(mod._logprobs_fwd_kernel, "bf16", {"HAS_ENTROPY": True, "BLOCK_V": 8192}, 16) == 0

@pytest.mark.gpu
@pytest.mark.parametrize("V", [151936, 128256])
def test_gpu_real_shapes_bf16(V):
    """Compiled kernels at real vocabularies, bf16: against the PyTorch path in float32 on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(0)
    N = 4096
    logits = (torch.randn(N, V, device="cuda", generator=g) * 3).bfloat16()
    labels = torch.randint(0, V, (N,), device="cuda", generator=g)
    labels[::7] = -100
    g_lp, g_ent = torch.randn(N, device="cuda", generator=g), torch.randn(N, device="cuda", generator=g)
    x = logits.clone().requires_grad_(True)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lp, ent = token_logprobs(x, labels, return_entropy=True, backend="triton")
    (lp * g_lp + ent * g_ent).sum().backward()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 1.1 * logits.numel() * 2  # the bf16 grad, no float32 [N, V]
    xr = logits.clone().requires_grad_(True)
    lp0, ent0 = reference.token_logprobs(xr, labels, return_entropy=True)
    (lp0 * g_lp + ent0 * g_ent).sum().backward()
    torch.testing.assert_close(lp, lp0, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(ent, ent0, atol=1e-3, rtol=1e-4)
    atol = 2 ** -7 * xr.grad.abs().max().item()
    torch.testing.assert_close(x.grad.float(), xr.grad.float(), atol=atol, rtol=0)


@pytest.mark.gpu
def test_gpu_more_than_2_31_logits_last_rows():
    """N x V > 2^31 (int64 offsets): the last rows' lp, entropy and dlogits against the PyTorch path."""
    V = 151936
    N = (1 << 31) // V + 64
    g = torch.Generator(device="cuda").manual_seed(1)
    logits = torch.empty(N, V, device="cuda", dtype=torch.bfloat16)
    logits[:-64].fill_(0.5)
    logits[-64:] = (torch.randn(64, V, device="cuda", generator=g) * 3).bfloat16()
    labels = torch.randint(0, V, (N,), device="cuda", generator=g)
    g_lp, g_ent = torch.randn(N, device="cuda", generator=g), torch.randn(N, device="cuda", generator=g)
    x = logits.requires_grad_(True)
    lp, ent = token_logprobs(x, labels, return_entropy=True, backend="triton")
    (lp * g_lp + ent * g_ent).sum().backward()
    tail = logits.detach()[-64:].clone().requires_grad_(True)
    lp0, ent0 = reference.token_logprobs(tail, labels[-64:], return_entropy=True)
    (lp0 * g_lp[-64:] + ent0 * g_ent[-64:]).sum().backward()
    torch.testing.assert_close(lp[-64:], lp0, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(ent[-64:], ent0, atol=1e-3, rtol=1e-4)
    atol = 2 ** -7 * tail.grad.abs().max().item()
    torch.testing.assert_close(x.grad[-64:].float(), tail.grad.float(), atol=atol, rtol=0)
    torch.testing.assert_close(ent[:-64], torch.full_like(ent[:-64], float(torch.tensor(V).log())), atol=1e-3,
                               rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["lanes", "blocks"])
def test_gpu_unaligned_vocab_151665(variant):
    """V = 151665 (a vocabulary sliced to the tokenizer: rows start at every 2-byte offset), bf16, both
    row kernels, as a slice of a wider tensor too: against the PyTorch path."""
    from fastrlhf.kernels._triton_utils import Variant
    from fastrlhf.kernels.logprobs import _token_logprobs_triton
    V, N = 151665, 2048
    g = torch.Generator(device="cuda").manual_seed(2)
    wide = (torch.randn(N, V + 271, device="cuda", generator=g) * 3).bfloat16()
    labels = torch.randint(0, V, (N,), device="cuda", generator=g)
    for logits in (wide[:, :V].contiguous(), wide[:, :V], wide[:, 3:V + 3]):
        lp, ent = _token_logprobs_triton(logits, labels, 0.9, -100, True, Variant(row=variant))
        lp0, ent0 = reference.token_logprobs(logits, labels, temperature=0.9, return_entropy=True)
        torch.testing.assert_close(lp, lp0, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(ent, ent0, atol=1e-3, rtol=1e-4)
