"""Instructions per element of the forward row kernels, counted in their sm90 SASS (no GPU needed: the
kernels are compiled ahead of time and disassembled with the cuobjdump / nvdisasm that ship with triton).

    python -m bench.kernel_sass

For each kernel: SASS instructions in the hot loop body divided by the elements each thread handles per
iteration, registers and stack (spills) from ``cuobjdump -res-usage``. The row kernels are limited by
instruction issue before bandwidth above ~12 instructions per element on H100/H200 (issue 14).
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import tempfile

SIG = {"x_ptr": "*bf16", "stride_xa": "i64", "stride_xr": "i64", "R": "i32", "labels_ptr": "*i64",
       "lp_ptr": "*fp32", "ent_ptr": "*fp32", "lse_ptr": "*fp32", "V": "i32", "inv_temp": "fp32",
       "ignore_index": "i32"}
# (name, kernel attribute, constexprs, warps, elements per thread per loop iteration)
KERNELS = (
    ("round2_lanes_entropy", "_logprobs_fwd_lanes_kernel", {"HAS_ENTROPY": True, "BLOCK_V": 2048, "ALIGN": 8}, 8),
    ("round2_lanes", "_logprobs_fwd_lanes_kernel", {"HAS_ENTROPY": False, "BLOCK_V": 2048, "ALIGN": 8}, 8),
    ("round1_blocks_entropy", "_logprobs_fwd_kernel", {"HAS_ENTROPY": True, "BLOCK_V": 8192}, 16),
    ("round1_blocks", "_logprobs_fwd_kernel", {"HAS_ENTROPY": False, "BLOCK_V": 8192}, 16),
)


def _compile(kernel, constexprs: dict, warps: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource
    fn = triton.runtime.jit.JITFunction(kernel.fn)
    full = {**SIG, **{k: "constexpr" for k in constexprs}}
    # an aligned base and row stride, as the runtime specializes for a 16-byte aligned [N, V] with V % 8 == 0
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in ("x_ptr", "stride_xr")}
    src = ASTSource(fn, {a: full[a] for a in fn.arg_names}, constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def loop_sizes(sass: str) -> list[int]:
    """Instruction counts of the loops (a label and a later branch back to it), in program order."""
    lines = sass.splitlines()
    labels = {ln.strip().rstrip(":"): i for i, ln in enumerate(lines) if re.match(r"^\s*\.?LBB\w*:", ln)}
    sizes = []
    for i, ln in enumerate(lines):
        m = re.search(r"BRA\s+`?\(?(\.?LBB\w+)", ln)
        if m and labels.get(m.group(1), i) < i:
            body = [x for x in lines[labels[m.group(1)] + 1:i + 1]
                    if x.strip() and not re.match(r"^\s*\.?LBB\w*:", x)]
            sizes.append(len(body))
    return sizes


def stats() -> list[dict]:
    from triton.tools.disasm import get_sass
    mod = importlib.import_module("fastrlhf.kernels.logprobs")
    rows = []
    for name, attr, constexprs, warps in KERNELS:
        compiled = _compile(getattr(mod, attr), constexprs, warps)
        loop = loop_sizes(get_sass(compiled.asm["cubin"]))[0]  # the first loop: the unmasked body
        per_thread = constexprs["BLOCK_V"] // (32 * warps)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+).*?STACK:(\d+)", res, re.S)
        rows.append({"kernel": name, "loop_instructions": loop, "elements_per_thread": per_thread,
                     "per_element": round(loop / per_thread, 2), "registers": int(m.group(1)) if m else None,
                     "stack_bytes": int(m.group(2)) if m else None})
    return rows


if __name__ == "__main__":
    for row in stats():
        print(row)
