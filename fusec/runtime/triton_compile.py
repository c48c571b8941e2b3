"""Compiling a generated Triton kernel (its source, not a lowered program) to a cubin on any machine.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` needs no GPU. Each pointer is
specialised as jax-triton specialises it (16-byte aligned), so the registers and spills reported
here are those of the kernel ``call_triton_kernel`` launches. ptxas, nvdisasm and cuobjdump are
run as for the Pallas kernels (:func:`fusec.runtime.gpu_compile.finish_compiled`).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from fusec.codegen.triton.kernel import TritonKernel
from fusec.codegen.triton.load import jit_function
from fusec.runtime.gpu_compile import CompiledKernel, finish_compiled, scoped_cache_dir

# NumPy dtype name -> Triton's element type name (jax-triton's mapping).
TRITON_TYPES = {
    "bfloat16": "bf16", "float64": "fp64", "float32": "fp32", "float16": "fp16",
    "float8_e4m3fn": "fp8e4nv", "float8_e5m2": "fp8e5",
    "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8",
    "uint64": "u64", "uint32": "u32", "uint16": "u16", "uint8": "u8", "bool": "i1",
}


def _element_type(dtype: str) -> str:
    name = np.dtype(dtype).name if dtype not in TRITON_TYPES else dtype
    if name not in TRITON_TYPES:
        raise ValueError(f"no Triton element type for dtype {dtype!r}")
    return TRITON_TYPES[name]


def kernel_signature(kernel: TritonKernel, arg_names: list[str]) -> dict[str, str]:
    """``ASTSource``'s signature for ``kernel``: ``*fp32``-style pointers for the inputs then the
    outputs, ``constexpr`` for the rest; checks the source declares exactly those parameters."""
    arrays = [*kernel.inputs, *kernel.outputs]
    constexprs = dict(kernel.constexprs)
    expected = len(arrays) + len(constexprs)
    if len(arg_names) != expected or set(arg_names[len(arrays):]) != set(constexprs):
        raise ValueError(f"kernel {kernel.name!r} declares parameters {arg_names}; expected {len(arrays)} "
                         f"pointers then the constexprs {sorted(constexprs)}")
    signature = {name: "*" + _element_type(sig.dtype) for name, sig in zip(arg_names, arrays)}
    signature |= {name: "constexpr" for name in arg_names[len(arrays):]}
    return signature


def compile_triton_kernel(kernel: TritonKernel, arch: int = 90, sass: bool = True) -> CompiledKernel:
    """``kernel`` compiled for ``sm_{arch}`` (80, 90, ...) on this machine: its registers and spills
    (ptxas), dynamic and static shared memory, cubin and, with ``sass``, its SASS listing."""
    fn = jit_function(kernel, interpret=False)
    arg_names = list(fn.arg_names)
    signature = kernel_signature(kernel, arg_names)
    n_pointers = len(kernel.inputs) + len(kernel.outputs)
    with tempfile.TemporaryDirectory(prefix="fusec-triton-") as tmp, scoped_cache_dir(os.path.join(tmp, "cache")):
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        attrs = {(i,): [["tt.divisibility", 16]] for i in range(n_pointers)}
        source = ASTSource(fn=fn, signature=signature, constexprs=dict(kernel.constexprs), attrs=attrs)
        # FMA contraction on, as in call_triton_kernel (and XLA's GPU backend).
        options = {"num_warps": kernel.num_warps, "num_stages": kernel.num_stages, "enable_fp_fusion": True}
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        launch = {"num_warps": kernel.num_warps, "num_stages": kernel.num_stages, "grid": kernel.grid}
        return finish_compiled(compiled, kernel.name, arch, launch, os.path.join(tmp, kernel.name), sass)
