"""Python literals and dtype names in generated kernel source."""

from __future__ import annotations

import math

from fusec.ir import DType, Value


def jnp_dtype(t: Value) -> str:
    elem = t.type.elem
    assert isinstance(elem, DType)
    return f"jnp.{elem.numpy_name}" if elem.name != "bool" else "jnp.bool_"


def literal(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):  # keeping its sign: copysign and bit casts see it
            return '-float("nan")' if math.copysign(1.0, value) < 0 else 'float("nan")'
        if math.isinf(value):
            return 'float("inf")' if value > 0 else '-float("inf")'
    return repr(value)
