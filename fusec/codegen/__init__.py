"""Code generation: IR modules to runnable JAX functions (reference XLA backend for now)."""

from fusec.codegen.backend import BACKENDS, check_backend, compile_module

__all__ = ["BACKENDS", "check_backend", "compile_module"]
