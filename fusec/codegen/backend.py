"""Backends: each turns an IR module into a callable over the entry's flat parameters, its kernels
built as backend-neutral :class:`~fusec.codegen.kernel_spec.KernelSpec`s. They are looked up by
name in a registry; ``auto`` picks Pallas where there is a GPU, else the XLA reference."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fusec.errors import Unsupported
from fusec.ir import Module

KernelCaller = Callable[[Any, list[Any]], list[Any]]


@dataclass(frozen=True)
class CompiledModule:
    """A runnable module: ``run(*params) -> list`` and its generated kernels by name."""

    run: Callable[..., list[Any]]
    kernels: dict[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    """A code generator. ``call_kernel`` binds a kernel (the runtime's primitive); ``make_weak``
    marks a value weakly typed; ``interpret`` asks for kernels tiled for and run by an interpreter."""

    name: str
    kernel_target: str | None  # the passes.target description its kernels obey (None: no kernels)

    def compile(self, module: Module, *, interpret: bool, call_kernel: KernelCaller | None,
                make_weak: Callable[[Any], Any] | None) -> CompiledModule: ...


@dataclass(frozen=True)
class XlaBackend:
    """The reference: every op (kernels' callees too) as plain ``lax`` calls."""

    name: str = "xla"
    kernel_target: str | None = None

    def compile(self, module: Module, *, interpret: bool, call_kernel: KernelCaller | None,
                make_weak: Callable[[Any], Any] | None) -> CompiledModule:
        from fusec.codegen.xla import module_to_callable
        return CompiledModule(module_to_callable(module, make_weak))


@dataclass(frozen=True)
class PallasBackend:
    """Kernels from tile programs as Pallas calls (Triton on NVIDIA GPUs, interpret mode on CPU)."""

    name: str = "pallas"
    kernel_target: str | None = "pallas-triton"

    def compile(self, module: Module, *, interpret: bool, call_kernel: KernelCaller | None,
                make_weak: Callable[[Any], Any] | None) -> CompiledModule:
        from fusec.codegen import pallas
        run, kernels = pallas.module_to_callable(module, interpret, call_kernel, make_weak)
        return CompiledModule(run, kernels)


@dataclass(frozen=True)
class TritonBackend:
    """Kernels from tile programs as Triton source: the Triton interpreter on a CPU, and
    ``jax_triton.triton_call`` on NVIDIA GPUs (a kernel Triton source cannot express here falls
    back to its Pallas kernel, with a warning)."""

    name: str = "triton"
    kernel_target: str | None = "triton"

    def compile(self, module: Module, *, interpret: bool, call_kernel: KernelCaller | None,
                make_weak: Callable[[Any], Any] | None) -> CompiledModule:
        from fusec.codegen.triton import build
        run, kernels = build.module_to_callable(module, interpret, call_kernel, make_weak)
        return CompiledModule(run, kernels)


BACKEND_REGISTRY: dict[str, Backend] = {}
_NOT_BUILT: tuple[str, ...] = ()


def register_backend(backend: Backend) -> Backend:
    """Makes ``backend`` available by its name to ``fusec.jit(..., backend=...)``."""
    BACKEND_REGISTRY[backend.name] = backend
    return backend


register_backend(XlaBackend())
register_backend(PallasBackend())
register_backend(TritonBackend())


def backend_names() -> tuple[str, ...]:
    return ("auto", *BACKEND_REGISTRY, *(n for n in _NOT_BUILT if n not in BACKEND_REGISTRY))


def has_gpu() -> bool:
    """Whether JAX sees an NVIDIA GPU."""
    import jax

    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def check_backend(name: str) -> str:
    """Validates a backend name and resolves ``auto`` (Pallas with a GPU, else the reference)."""
    if name not in backend_names():
        raise ValueError(f"backend must be one of {', '.join(map(repr, backend_names()))}; got {name!r}")
    if name not in BACKEND_REGISTRY and name != "auto":
        raise Unsupported(f"fusec backend {name!r} is not built yet; use backend='pallas', 'xla' or 'auto'")
    if name == "auto":
        return "pallas" if has_gpu() else "xla"
    return name


def compile_module(module: Module, backend: str, interpret: bool = True,
                   call_kernel: KernelCaller | None = None,
                   make_weak: Callable[[Any], Any] | None = None) -> CompiledModule:
    """Compiles the module's entry function for the (resolved) backend."""
    if backend not in BACKEND_REGISTRY:
        raise Unsupported(f"fusec backend {backend!r} is not built yet")
    return BACKEND_REGISTRY[backend].compile(module, interpret=interpret, call_kernel=call_kernel,
                                             make_weak=make_weak)
