"""The one place fusec touches JAX internals, each use guarded so a JAX upgrade degrades gracefully."""

from __future__ import annotations

from typing import Any

try:  # jax 0.10 / 0.11
    from jax._src.lax.lax import _convert_element_type as _convert_with_weak_type
except ImportError:  # pragma: no cover - a JAX release without it
    _convert_with_weak_type = None


def make_weak(x: Any) -> Any:
    """``x`` marked weakly typed, as JAX marks results computed only from Python scalars.

    fusec's IR spells dtypes out, so its results are strongly typed; outputs that ``jax.jit`` would
    return weakly typed get the mark back here, so they promote the same way afterwards.
    """
    if _convert_with_weak_type is None:
        return x
    return _convert_with_weak_type(x, weak_type=True)
