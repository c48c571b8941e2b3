"""Backend lookup: a backend turns an IR module into a callable over the entry's flat parameters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fusec.errors import Unsupported
from fusec.ir import Module

BACKENDS = ("auto", "xla", "pallas", "triton")
_NOT_BUILT = ("triton",)


def has_gpu() -> bool:
    """Whether JAX sees an NVIDIA GPU."""
    import jax

    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def check_backend(name: str) -> str:
    """Validates a backend name and resolves ``auto`` (Pallas with a GPU, else the reference)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {name!r}")
    if name in _NOT_BUILT:
        raise Unsupported(f"fusec backend {name!r} is not built yet; use backend='pallas', 'xla' or 'auto'")
    if name == "auto":
        return "pallas" if has_gpu() else "xla"
    return name


@dataclass(frozen=True)
class CompiledModule:
    """A runnable module: ``run(*params) -> list`` and its generated kernels by name."""

    run: Callable[..., list[Any]]
    kernels: dict[str, Any] = field(default_factory=dict)


def compile_module(module: Module, backend: str, interpret: bool = True,
                   call_kernel: Callable[[Any, list[Any]], list[Any]] | None = None,
                   make_weak: Callable[[Any], Any] | None = None) -> CompiledModule:
    """Compiles the module's entry function for the (resolved) backend. ``call_kernel`` binds a
    kernel (the runtime's primitive); ``make_weak`` marks a value weakly typed."""
    if backend == "xla":
        from fusec.codegen.xla import module_to_callable
        return CompiledModule(module_to_callable(module, make_weak))
    if backend == "pallas":
        from fusec.codegen import pallas
        run, kernels = pallas.module_to_callable(module, interpret, call_kernel, make_weak)
        return CompiledModule(run, kernels)
    raise Unsupported(f"fusec backend {backend!r} is not built yet")
