"""Launch helpers shared by the Triton kernels: lazy kernel objects, block sizes, launch checks.

``triton.jit`` decides between the compiler and the CPU interpreter when it decorates a function
(``TRITON_INTERPRET`` read at import time). fastrlhf decides nothing at import time, so a kernel is
kept as its plain Python function and built for the current mode at launch, once per mode.

The same import-time choice applies to Triton's own ``@jit`` library functions (``tl.sum``, ``tl.max``,
``tl.zeros``, ...): imported without ``TRITON_INTERPRET=1`` they cannot run in the interpreter. So the
kernels use only builtins of ``triton.language`` (``tl.full``, ``tl.where``, ``tl.exp``, ...) and reduce
with ``tl.reduce(x, 0, tl.standard._sum_combine / _elementwise_max)``, which the compiler inlines and
the interpreter recognises and runs in numpy. Then ``TRITON_INTERPRET=1`` may be set at any time.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton wheel for this platform (macOS, Windows): only backend="torch" runs
    triton = tl = None

from ._backend import interpreter_enabled

# Largest vocabulary block a row program holds in registers; 8192 fp32 values over 16 warps is
# 16 values per thread (Triton's reductions stay in registers at this size on sm80/sm90).
_MAX_BLOCK_V = 8192


class LazyKernel:
    """A Triton kernel built on first launch for the mode in force then (compiled or interpreted).

    Launch it as a ``triton.jit`` function: ``kernel[grid](*args, **meta)``. The kernel may not call other
    ``@triton.jit`` functions (helpers would need the same treatment); each kernel here is self-contained.
    """

    def __init__(self, fn):
        self.fn = fn
        self._built = {}  # {interpret: bool -> JITFunction | InterpretedFunction}

    def _kernel(self):
        interpret = interpreter_enabled()
        kernel = self._built.get(interpret)
        if kernel is None:
            if interpret:
                from triton.runtime.interpreter import InterpretedFunction
                kernel = InterpretedFunction(self.fn)
            else:
                kernel = triton.runtime.jit.JITFunction(self.fn)
            self._built[interpret] = kernel
        return kernel

    def __getitem__(self, grid):
        return self._kernel()[grid]

    @property
    def __name__(self):
        return self.fn.__name__


def lazy_jit(fn) -> LazyKernel:
    """Decorator: ``@lazy_jit`` instead of ``@triton.jit`` (see the module docstring)."""
    return LazyKernel(fn)


def _version(text: str) -> tuple[int, int]:
    major, minor = (text.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def interpreter_unavailable_reason() -> str | None:
    """Why the Triton interpreter cannot run in this environment, or None when it can.

    triton < 3.7 hands integer kernel arguments to the program as 1-element numpy arrays and ``range()``
    calls ``int()`` on them, which numpy >= 2.4 refuses (triton-lang/triton#9171, fixed by #9172). The
    GPU machine has this pair (triton 3.6, numpy 2.5); there the compiled path is what runs.
    """
    import numpy

    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"the Triton interpreter of triton {triton.__version__} cannot run with numpy "
                f"{numpy.__version__} (numpy: 'only 0-dimensional arrays can be converted to Python "
                f"scalars', triton-lang/triton#9171)")
    return None


def check_launchable(op: str, *tensors: torch.Tensor) -> None:
    """Raise a clear error when the Triton path cannot run on these tensors (CPU without the interpreter,
    or an interpreter that cannot run with this numpy)."""
    if triton is None:
        raise RuntimeError(f"{op}: backend='triton' needs the triton package, which is not installed here; "
                           "use backend='torch' or backend='auto'")
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cuda" and not interpreter_enabled():
        return
    if device.type in ("cpu", "cuda") and interpreter_enabled():
        reason = interpreter_unavailable_reason()
        if reason is None:
            return
        raise RuntimeError(f"{op}: TRITON_INTERPRET=1 is set but {reason}; use backend='torch'")
    raise RuntimeError(f"{op}: backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
                       f"(got {device}); use backend='torch' or backend='auto'")


def autocast_inputs(device: torch.device, *tensors: torch.Tensor | None) -> tuple:
    """Inside ``torch.autocast`` for ``device``, the floating inputs cast to the autocast dtype: the dtype
    ``hidden @ W.T`` would run in there, and what the PyTorch path computes. Differentiable casts, so
    fp32 master weights get fp32 grads. Callers then run the op with autocast off, so the matmuls inside
    (and their ``out=`` buffers) see exactly these dtypes. Outside autocast: the tensors unchanged.
    """
    if not torch.is_autocast_enabled(device.type):
        return tensors
    dtype = torch.get_autocast_dtype(device.type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def reject_float64(op: str, **named: torch.Tensor) -> None:
    """The kernels compute in fp32: float64 inputs belong to the PyTorch path (the float64 oracle)."""
    for name, t in named.items():
        if t.dtype == torch.float64:
            raise TypeError(f"{op}: the Triton path takes fp32/bf16/fp16 {name}, got float64; use "
                            f"backend='torch' (or 'auto', which sends float64 to the PyTorch path)")


def vocab_block(V: int) -> int:
    """Vocabulary block of a row program: the whole row when small, else ``_MAX_BLOCK_V``."""
    return min(triton.next_power_of_2(V), _MAX_BLOCK_V)


def row_warps(block: int) -> int:
    """Warps for a row program over ``block`` elements (one warp per 512 elements, 4 to 16)."""
    return max(4, min(16, block // 512))


# Tile of the per-lane forward row kernel: 2048 lanes over 8 warps is 8 elements per thread per step, one
# 16-byte load in bf16; three fp32 running values per element stay in registers.
_LANES_BLOCK = 2048


def lanes_tile(V: int) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` of the per-lane forward row kernel for vocabulary ``V``."""
    block = min(triton.next_power_of_2(V), _LANES_BLOCK)
    return block, max(1, min(8, block // 256))


def row_align(x: torch.Tensor) -> int:
    """Elements per 16 bytes when ``x``'s storage starts 16-byte aligned (the row kernels then peel a short
    head per row to reach the first aligned element and load the rest as 16-byte vectors), else 1."""
    return 16 // x.element_size() if x.data_ptr() % 16 == 0 and x.element_size() <= 16 else 1


def rows_3d(x: torch.Tensor) -> torch.Tensor:
    """View ``x [..., V]`` as ``[A, R, V]`` so a kernel can address row ``n`` as ``(n // R, n % R)``.

    Keeps strided inputs such as ``logits[:, :-1]`` as views (no copy of the logits); copies only when
    the last dim is not contiguous or more than two leading dims cannot be merged.
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(0)
    if x.dim() == 3:
        return x
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def compile_for_cuda(kernel: LazyKernel, signature: dict, constexprs: dict, *, num_warps: int = 4,
                     capability: int = 90):
    """Compile ``kernel`` ahead of time for an NVIDIA GPU of ``capability`` (90 = H100), no device needed.

    ``signature`` maps each runtime argument to a Triton type string (``"*bf16"``, ``"i64"``, ``"fp32"``);
    ``constexprs`` gives the values of the ``tl.constexpr`` ones. Lets CPU-only CI check the compiled path
    (the interpreter accepts programs the compiler rejects). Returns the compiled kernel.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    fn = triton.runtime.jit.JITFunction(kernel.fn)
    full = {**signature, **{k: "constexpr" for k in constexprs}}
    missing = [a for a in fn.arg_names if a not in full]
    if missing:
        raise ValueError(f"compile_for_cuda({kernel.__name__}): no type for {missing}")
    ordered = {a: full[a] for a in fn.arg_names}
    return triton.compile(ASTSource(fn, ordered, constexprs), target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "enable_fp_fusion": True})


def device_guard(t: torch.Tensor):
    """Context for launching kernels on ``t``'s device: ``torch.cuda.device(t.device)`` for a CUDA tensor
    (Triton launches on the *current* CUDA device and stream; inputs on cuda:1 without ``set_device`` would
    otherwise be read on cuda:0), a no-op context for CPU tensors (the interpreter)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


class Variant(NamedTuple):
    """Which implementation of each kernel step runs (internal: the bench times old against new).

    - ``row``: forward row kernel. "lanes" (per-lane running max/sum/entropy, one cross-warp combine per
      row, exp2 with the temperature folded in, aligned/tail split) or "blocks" (the round-1 kernel: a
      reduction per vocabulary block).
    - ``grad_w``: the linear ops' grad_W. "auto" (``linear_token_logprobs``: "vocab" when N <= V and no
      chunk_size, else "fp32"; ``fused_ppo_loss``: "fp32"), "vocab" (vocabulary-split backward, grad_W
      written once per slab), "fp32" (token chunks summed into an fp32 accumulator, cast once) or "weight"
      (token chunks read-modify-written in the weight dtype, round 1). See ``linear_logprobs.py``.
    - ``logits_grad``: ``fused_ppo_loss_from_logits``. "backward" (dlogits computed in backward from the
      saved lse/entropy and token coefficients) or "forward" (an [N, V] buffer from forward, round 1).
    - ``chunk``: default token-chunk rows of the linear ops. "sm" (multiple of 256 sized to fill the SMs,
      ``chunk_rows``) or "bytes" (~256 MB of logits, round 1).
    """
    row: str = "lanes"
    grad_w: str = "auto"
    logits_grad: str = "backward"
    chunk: str = "sm"


CURRENT = Variant()
ROUND1 = Variant(row="blocks", grad_w="weight", logits_grad="forward", chunk="bytes")
