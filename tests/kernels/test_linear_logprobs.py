"""linear_token_logprobs, Triton path (interpreter on CPU): against the PyTorch path in float64 on the same
(exactly upcast) hidden, weight and bias.

Tolerances: the logits matmul rounds to the input dtype (as ``hidden @ W.T + b`` does) and the float64 oracle
does not, so half dtypes get wider bounds; each is ~3x the measured error, which matches the PyTorch path
at the same dtype. (lp/entropy atol, grads relative to the largest |grad|.)
"""
from __future__ import annotations

import pytest
import torch

from fastrlhf.kernels import linear_token_logprobs, reference


# Measured (triton path; PyTorch path at the same dtype in brackets): lp/entropy fp32 2.2e-6, fp16 4.5e-3,
# bf16 3e-2 (same); rel grads fp32 1e-6 (1.1e-6), fp16 1.6e-3 (1.4e-3), bf16 2.2e-2 (1.9e-2).
FWD_TOL = {torch.float32: 1e-5, torch.float16: 1.5e-2, torch.bfloat16: 1e-1}
GRAD_REL = {torch.float32: 5e-6, torch.float16: 5e-3, torch.bfloat16: 6e-2}


def _run(fn, hidden, weight, bias, labels, g_lp, g_ent, double=False, **kw):
    up = (lambda t: t.double()) if double else (lambda t: t)
    leaves = [None if t is None else up(t).detach().requires_grad_(True) for t in (hidden, weight, bias)]
    lp, ent = fn(leaves[0], leaves[1], labels, bias=leaves[2], return_entropy=True, **kw)
    (lp * g_lp.to(lp.dtype) + ent * g_ent.to(ent.dtype)).sum().backward()
    return lp.detach(), ent.detach(), [None if t is None else t.grad for t in leaves]


def _check(got, want, dtype):
    for a, b in zip(got[:2], want[:2]):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, atol=FWD_TOL[dtype], rtol=0)
    for a, b in zip(got[2], want[2]):
        if b is None:
            assert a is None
            continue
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, atol=GRAD_REL[dtype] * b.abs().max().item(), rtol=0)


def _inputs(B, T, V, H, dtype, mask, garbage, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = garbage(torch.randn(B, T, H, generator=g), mask).to(dtype)  # NaN/inf rows where ignored
    weight = (torch.randn(V, H, generator=g) / H ** 0.5 * 3).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    labels = torch.where(mask, torch.randint(0, V, (B, T), generator=g), -100)
    return hidden, weight, bias, labels, torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [7, None])
def test_matches_float64_reference(interpret, dtype, chunk_size, make_mask, garbage):
    """hidden (3, 37, 48), weight (1031, 48), bias; chunks of 7 tokens (ragged last one) or the default;
    ragged mask with an empty row, garbage in ignored hidden rows, T = 0.9, non-unit upstream grads."""
    mask = make_mask(3, 37, "ragged")
    hidden, weight, bias, labels, g_lp, g_ent = _inputs(3, 37, 1031, 48, dtype, mask, garbage)
    got = _run(linear_token_logprobs, hidden, weight, bias, labels, g_lp, g_ent, temperature=0.9,
               chunk_size=chunk_size, backend="triton")
    want = _run(reference.linear_token_logprobs, hidden, weight, bias, labels, g_lp, g_ent, double=True,
                temperature=0.9)
    assert [t.dtype for t in got[2]] == [dtype] * 3
    _check(got, want, dtype)
    assert (got[0][~mask] == 0).all() and (got[1][~mask] == 0).all()


def test_no_bias_left_padding_and_multi_block_vocab(interpret, make_mask, garbage):
    """V = 8192 + 1000 (two vocabulary blocks in the row kernel), no bias, left padding, logprobs only."""
    mask = make_mask(2, 5, "left")
    hidden, weight, _, labels, g_lp, _ = _inputs(2, 5, 9192, 16, torch.float32, mask, garbage, seed=1)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lp = linear_token_logprobs(h1, w1, labels, chunk_size=3, backend="triton")
    (lp * g_lp).sum().backward()
    lp0, _, (gh0, gw0, _) = _run(reference.linear_token_logprobs, hidden, weight, None, labels, g_lp,
                                 torch.zeros(2, 5), double=True)
    torch.testing.assert_close(lp.detach().double(), lp0, atol=FWD_TOL[torch.float32], rtol=0)
    for a, b in ((h1.grad, gh0), (w1.grad, gw0)):
        torch.testing.assert_close(a.double(), b, atol=GRAD_REL[torch.float32] * b.abs().max().item(), rtol=0)


def test_only_some_inputs_need_grad(interpret, make_mask, garbage):
    """Frozen weight (only hidden's grad), and a frozen trunk (only weight and bias grads)."""
    mask = make_mask(2, 9, "holes")
    hidden, weight, bias, labels, g_lp, g_ent = _inputs(2, 9, 300, 24, torch.float32, mask, garbage, seed=2)
    want = _run(reference.linear_token_logprobs, hidden, weight, bias, labels, g_lp, g_ent, double=True)
    h = hidden.clone().requires_grad_(True)
    lp, ent = linear_token_logprobs(h, weight, labels, bias=bias, return_entropy=True, backend="triton")
    (lp * g_lp + ent * g_ent).sum().backward()
    torch.testing.assert_close(h.grad.double(), want[2][0], atol=1e-5 * want[2][0].abs().max().item(), rtol=0)
    w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    lp, ent = linear_token_logprobs(hidden, w, labels, bias=b, return_entropy=True, backend="triton")
    (lp * g_lp + ent * g_ent).sum().backward()
    torch.testing.assert_close(w.grad.double(), want[2][1], atol=1e-5 * want[2][1].abs().max().item(), rtol=0)
    torch.testing.assert_close(b.grad.double(), want[2][2], atol=1e-5 * want[2][2].abs().max().item(), rtol=0)


def test_memory_bounded_by_one_chunk(interpret, float_guard):
    """fp32: no float tensor bigger than one chunk of logits (4 x 700), whatever N (H = 2 keeps the weight
    and its grad, 700 x 2, below that)."""
    for n in (8, 24):
        h = torch.randn(n, 2, requires_grad=True)
        w = torch.randn(700, 2, requires_grad=True)
        labels = torch.randint(0, 700, (n,))
        with float_guard() as guard:
            lp, ent = linear_token_logprobs(h, w, labels, return_entropy=True, chunk_size=4, backend="triton")
            (lp + ent).sum().backward()
        assert guard.largest <= 4 * 700


def test_under_autocast_matches_torch_path(interpret):
    """Inside torch.autocast(bf16) with fp32 hidden and weight: the matmuls run in bf16 on both paths,
    the grads of the fp32 leaves are fp32 (bf16 tolerances)."""
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(2, 7, 16, generator=g), torch.randn(90, 16, generator=g)
    labels, g_lp = torch.randint(0, 90, (2, 7), generator=g), torch.randn(2, 7, generator=g)
    out = []
    for backend in ("triton", "torch"):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp = linear_token_logprobs(h, w, labels, chunk_size=5, backend=backend)
            (lp * g_lp).sum().backward()
        out.append((lp.detach(), h.grad, w.grad))
    (lp, gh, gw), (lp0, gh0, gw0) = out
    assert lp.dtype == gh.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(lp, lp0, atol=FWD_TOL[torch.bfloat16], rtol=0)
    for a, b in ((gh, gh0), (gw, gw0)):
        torch.testing.assert_close(a, b, atol=GRAD_REL[torch.bfloat16] * b.abs().max().item(), rtol=0)


def test_auto_backend_and_errors(interpret, monkeypatch):
    h, w, labels = torch.randn(2, 3, 8), torch.randn(40, 8), torch.randint(0, 40, (2, 3))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    want = linear_token_logprobs(h, w, labels)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        linear_token_logprobs(h, w, labels, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    got = linear_token_logprobs(h, w.requires_grad_(True), labels)
    assert got.grad_fn.next_functions[0][0].name() == "LinearTokenLogprobsFunctionBackward"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="hidden must be"):
        linear_token_logprobs(h, w[:, :5], labels, backend="triton")
    with pytest.raises(ValueError, match="chunk_size"):
        linear_token_logprobs(h, w, labels, chunk_size=0, backend="triton")
    with pytest.raises(ValueError, match=r"labels\[1, 2\] = 40"):
        linear_token_logprobs(h, w, torch.tensor([[0, 1, 2], [3, 4, 40]]), backend="triton")
    with pytest.raises(TypeError, match="float64"):
        linear_token_logprobs(h.double(), w.double(), labels, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("V,H", [(151936, 896), (151936, 2048), (128256, 4096)])
def test_gpu_real_shapes_bf16(V, H):
    """Compiled kernels around cuBLAS at real sizes, bf16, 4096 tokens: against the PyTorch path."""
    g = torch.Generator(device="cuda").manual_seed(0)
    N = 4096
    hidden = torch.randn(N, H, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(V, H, device="cuda", generator=g) / H ** 0.5 * 3).bfloat16()
    labels = torch.randint(0, V, (N,), device="cuda", generator=g)
    labels[::5] = -100
    g_lp, g_ent = torch.randn(N, device="cuda", generator=g), torch.randn(N, device="cuda", generator=g)
    got = _run(linear_token_logprobs, hidden, weight, None, labels, g_lp, g_ent, backend="triton")
    want = _run(linear_token_logprobs, hidden, weight, None, labels, g_lp, g_ent, backend="torch")
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b, atol=0.1, rtol=0)
    for a, b in zip(got[2][:2], want[2][:2]):
        torch.testing.assert_close(a.float(), b.float(), atol=4e-2 * b.float().abs().max().item(), rtol=0)


def test_chunk_rows_fill_the_sms_and_respect_the_budget():
    """Multiples of 256, >= max(2048, 2 * SMs * 128 * 256 / H), capped by the logits budget."""
    from fastrlhf.kernels.linear_logprobs import chunk_rows
    for V, H, sms in ((151936, 896, 132), (128256, 4096, 132), (128256, 2048, 132), (32000, 4096, 108),
                      (151936, 8192, 132), (50257, 768, 80)):
        rows = chunk_rows(V, H, 2, sms)
        cap = (1 << 30) // (V * 2)
        assert rows % 256 == 0 and 256 <= rows <= cap
        assert rows >= min(max(2048, 2 * sms * 128 * 256 / H), cap - 255)
    assert chunk_rows(128256, 4096, 2, 132) == 2304  # 2 * 132 * 128 * 256 / 4096 = 2112 -> 2304
    assert chunk_rows(151936, 896, 2, 132) == 3328  # wants 9728: capped at 1 GiB of logits
    assert chunk_rows(1 << 22, 64, 4, 132) == 256  # never below one M tile
    assert chunk_rows(151936, 896, 2, 132, budget_bytes=1 << 28) == 768


def test_chunk_size_invariance(interpret, make_mask, garbage):
    """fp32: chunks of 1, 5, 16 and the default give the same lp, entropy and grads to fp32 rounding."""
    mask = make_mask(2, 8, "left")
    hidden, weight, bias, labels, g_lp, g_ent = _inputs(2, 8, 257, 12, torch.float32, mask, garbage, seed=4)
    runs = [_run(linear_token_logprobs, hidden, weight, bias, labels, g_lp, g_ent, chunk_size=c,
                 backend="triton") for c in (1, 5, 16, None)]
    for got in runs[1:]:
        for a, b in zip(got[:2], runs[0][:2]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        for a, b in zip(got[2], runs[0][2]):
            torch.testing.assert_close(a, b, atol=1e-6 * b.abs().max().item(), rtol=0)


@pytest.mark.slow
def test_grad_w_error_at_many_chunks_bf16(interpret):
    """bf16, 48 chunks of 8 tokens: grad_W summed in fp32 (rounded once) is as close to float64 as the
    vocabulary-split backward (one GEMM over all tokens, the single-chunk error), and within a bound that
    round 1's bf16 accumulation (rounded once per chunk) exceeds.

    Measured relative Frobenius errors (seeds 0-2): fp32 accumulation and vocabulary split 4.5e-3 to
    4.9e-3 (equal); bf16 accumulation 8.4e-3 to 8.8e-3. (Slow: the interpreter runs 2300 row programs.)"""
    from fastrlhf.kernels._triton_utils import Variant
    from fastrlhf.kernels.linear_logprobs import _linear_token_logprobs_triton
    g = torch.Generator().manual_seed(0)
    N, H, V = 384, 32, 96
    h = torch.randn(N, H, generator=g).bfloat16()
    w = (torch.randn(V, H, generator=g) / H ** 0.5 * 3).bfloat16()
    labels, g_lp = torch.randint(0, V, (N,), generator=g), torch.randn(N, generator=g) + 1.0
    wd = w.double().requires_grad_(True)
    (reference.linear_token_logprobs(h.double(), wd, labels) * g_lp.double()).sum().backward()

    def rel_err(variant, chunk):
        w1 = w.clone().requires_grad_(True)
        lp = _linear_token_logprobs_triton(h, w1, labels, None, 1.0, -100, False, chunk, variant)
        (lp * g_lp).sum().backward()
        assert w1.grad.dtype == torch.bfloat16
        return ((w1.grad.double() - wd.grad).norm() / wd.grad.norm()).item()

    fp32_many, bf16_many = rel_err(Variant(grad_w="fp32"), 8), rel_err(Variant(grad_w="weight"), 8)
    one_pass = rel_err(Variant(grad_w="vocab"), None)  # N > V: auto would pick chunks; forced
    assert fp32_many < 6.5e-3 and fp32_many < 1.05 * one_pass
    assert bf16_many > 6.5e-3  # the bound above catches per-chunk bf16 accumulation


@pytest.mark.gpu
def test_gpu_grad_w_error_at_many_chunks():
    """bf16 on the GPU, 64 chunks of 256 tokens: grad_W (fp32 accumulation through cuBLAS addmm with
    out_dtype) as close to float64 as one chunk, and closer than round 1's bf16 accumulation."""
    from fastrlhf.kernels._triton_utils import CURRENT, Variant
    from fastrlhf.kernels.linear_logprobs import _linear_token_logprobs_triton
    g = torch.Generator(device="cuda").manual_seed(3)
    N, H, V = 64 * 256, 512, 32000
    h = torch.randn(N, H, device="cuda", generator=g).bfloat16()
    w = (torch.randn(V, H, device="cuda", generator=g) / H ** 0.5 * 3).bfloat16()
    labels = torch.randint(0, V, (N,), device="cuda", generator=g)
    g_lp = torch.randn(N, device="cuda", generator=g) + 1.0
    wd = w.double().requires_grad_(True)
    (reference.linear_token_logprobs(h.double(), wd, labels, chunk_size=2048) * g_lp.double()).sum().backward()

    def rel_err(variant, chunk):
        w1 = w.clone().requires_grad_(True)
        lp = _linear_token_logprobs_triton(h, w1, labels, None, 1.0, -100, False, chunk, variant)
        (lp * g_lp).sum().backward()
        return ((w1.grad.double() - wd.grad).norm() / wd.grad.norm()).item()

    fp32 = Variant(grad_w="fp32")
    many, one, r1 = rel_err(fp32, 256), rel_err(fp32, N), rel_err(Variant(grad_w="weight"), 256)
    vocab = rel_err(CURRENT, None)  # N = 16k <= V = 32k: vocabulary slabs
    print(f"grad_W rel. error: fp32 64 chunks {many:.3e}, one chunk {one:.3e}, bf16 accumulation {r1:.3e}, "
          f"vocabulary split {vocab:.3e}")
    assert many < 1.1 * one and many < 0.8 * r1 and vocab < 1.1 * one


@pytest.mark.gpu
def test_gpu_unaligned_vocab_and_default_chunks():
    """V = 151665 and the default chunk rows (multiple of 256) over a ragged number of tokens."""
    g = torch.Generator(device="cuda").manual_seed(4)
    N, H, V = 5000, 896, 151665
    hidden = torch.randn(N, H, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(V, H, device="cuda", generator=g) / H ** 0.5 * 3).bfloat16()
    labels = torch.randint(0, V, (N,), device="cuda", generator=g)
    g_lp, g_ent = torch.randn(N, device="cuda", generator=g), torch.randn(N, device="cuda", generator=g)
    got = _run(linear_token_logprobs, hidden, weight, None, labels, g_lp, g_ent, backend="triton")
    want = _run(linear_token_logprobs, hidden, weight, None, labels, g_lp, g_ent, backend="torch")
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b, atol=0.1, rtol=0)
    for a, b in zip(got[2][:2], want[2][:2]):
        torch.testing.assert_close(a.float(), b.float(), atol=4e-2 * b.float().abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_split_backward_matches_float64(interpret, dtype, make_mask, garbage, monkeypatch):
    """The vocabulary-split backward over 3 slabs of 256 columns (the last one 88 wide: labels fall in every
    slab and outside it), bias, left-padded mask with garbage in ignored rows and an empty row, T = 0.9,
    non-unit upstream grads: against float64, and against the token-chunk backward."""
    import sys

    from fastrlhf.kernels._triton_utils import CURRENT
    from fastrlhf.kernels.linear_logprobs import _linear_token_logprobs_triton, backward_mode
    mod = sys.modules["fastrlhf.kernels.linear_logprobs"]
    slabs = []
    monkeypatch.setattr(mod, "vocab_slab", lambda n, v, e: slabs.append(n) or 256)
    mask = make_mask(2, 19, "left")
    hidden, weight, bias, labels, g_lp, g_ent = _inputs(2, 19, 600, 24, dtype, mask, garbage, seed=7)
    assert backward_mode(CURRENT, 38, 600, None).grad_w == "vocab"
    assert backward_mode(CURRENT, 38, 600, 64).grad_w == "fp32"  # chunk_size asked for: token chunks
    assert backward_mode(CURRENT, 2000, 600, None).grad_w == "fp32"  # N > V: token chunks
    got = _run(linear_token_logprobs, hidden, weight, bias, labels, g_lp, g_ent, temperature=0.9,
               backend="triton")
    assert slabs == [int(mask.sum())]  # the slabs span the valid tokens only (padding skip)
    want = _run(reference.linear_token_logprobs, hidden, weight, bias, labels, g_lp, g_ent, double=True,
                temperature=0.9)
    assert [t.dtype for t in got[2]] == [dtype] * 3
    _check(got, want, dtype)
    chunks = _run(linear_token_logprobs, hidden, weight, bias, labels, g_lp, g_ent, temperature=0.9,
                  chunk_size=16, backend="triton")
    for a, b in zip(got[2], chunks[2]):
        torch.testing.assert_close(a.double(), b.double(), atol=GRAD_REL[dtype] * b.abs().max().item(), rtol=0)
    # the private entry point with vocab forced on a frozen weight: only hidden's grad
    h = hidden.clone().requires_grad_(True)
    lp = _linear_token_logprobs_triton(h, weight, labels, None, 1.0, -100, False, None,
                                       CURRENT._replace(grad_w="vocab"))
    (lp * g_lp).sum().backward()
    assert h.grad.dtype == dtype and torch.isfinite(h.grad).all() and (h.grad[~mask] == 0).all()


def test_accumulate_mm_sums_in_the_accumulator_dtype():
    """bf16 operands into an fp32 accumulator: the products are summed in fp32 (as the upcast product),
    64 times without drift, and the accumulator is not replaced; CPU takes the upcasting fallback."""
    from fastrlhf.kernels.linear_logprobs import _mixed_addmm_works, accumulate_mm
    g = torch.Generator().manual_seed(9)
    acc = torch.zeros(8, 6)
    want = torch.zeros(8, 6, dtype=torch.float64)
    for _ in range(64):
        a, b = torch.randn(8, 5, generator=g).bfloat16(), torch.randn(5, 6, generator=g).bfloat16()
        accumulate_mm(acc, a, b)
        want += a.double() @ b.double()
    assert acc.dtype == torch.float32
    torch.testing.assert_close(acc.double(), want, atol=1e-5, rtol=1e-6)
    assert not _mixed_addmm_works("cpu", torch.bfloat16, torch.float32)  # no CPU kernel for addmm.dtype


@pytest.mark.gpu
def test_gpu_mixed_addmm_accumulates_in_place():
    from fastrlhf.kernels.linear_logprobs import _mixed_addmm_works
    assert _mixed_addmm_works("cuda:0", torch.bfloat16, torch.float32), "cuBLAS bf16 -> fp32 addmm missing"
