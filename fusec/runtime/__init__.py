"""Runtime: compiled programs and how they run inside JAX."""

from fusec.codegen.triton.build import register_gpu_call
from fusec.runtime import partitioning  # noqa: F401  (registers the partitioned kernel lowering)
from fusec.runtime.program import Fallback, Program, build_program
from fusec.runtime.triton_call import call_triton_kernel

register_gpu_call(call_triton_kernel)  # the Triton backend's kernels on a GPU, through jax-triton

__all__ = ["Fallback", "Program", "build_program"]
