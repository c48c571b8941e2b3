"""Backend lookup: a backend turns an IR module into a callable over the entry's flat parameters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fusec.errors import Unsupported
from fusec.ir import Module

BACKENDS = ("auto", "xla", "pallas", "triton")
_NOT_BUILT = ("pallas", "triton")


def check_backend(name: str) -> str:
    """Validates a backend name and resolves ``auto``; raises ValueError or Unsupported."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {name!r}")
    if name in _NOT_BUILT:
        raise Unsupported(f"fusec backend {name!r} is not built yet; use backend='xla' or 'auto'")
    return "xla" if name == "auto" else name


def compile_module(module: Module, backend: str) -> Callable[..., list[Any]]:
    """A callable for the module's entry function on the (resolved) backend."""
    if backend == "xla":
        from fusec.codegen.xla import module_to_callable
        return module_to_callable(module)
    raise Unsupported(f"fusec backend {backend!r} is not built yet")
