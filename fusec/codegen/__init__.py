"""Code generation: IR modules to runnable JAX functions (reference XLA and Pallas backends)."""

from fusec.codegen.backend import (
    BACKEND_REGISTRY,
    Backend,
    CompiledModule,
    backend_names,
    check_backend,
    compile_module,
    has_gpu,
    register_backend,
)
from fusec.codegen.kernel_spec import KernelSpec

__all__ = ["BACKEND_REGISTRY", "Backend", "CompiledModule", "KernelSpec", "backend_names", "check_backend",
           "compile_module", "has_gpu", "register_backend"]
