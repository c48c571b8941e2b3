"""Code generation: IR modules to runnable JAX functions (reference XLA and Pallas backends)."""

from fusec.codegen.backend import BACKENDS, CompiledModule, check_backend, compile_module, has_gpu

__all__ = ["BACKENDS", "CompiledModule", "check_backend", "compile_module", "has_gpu"]
