"""JAX dtypes and avals to IR types."""

from __future__ import annotations

from typing import Any

import numpy as np

from fusec.ir.types import NUMPY_TO_FUSEC, DType, ElemType, ExtType, TensorType


def elem_type_of(dtype: Any) -> ElemType:
    """The IR element type of a NumPy/JAX dtype; dtypes fusec has no name for become ExtType."""
    try:
        name = np.dtype(dtype).name
    except TypeError:
        return ExtType(str(dtype))
    fusec_name = NUMPY_TO_FUSEC.get(name)
    return DType(fusec_name) if fusec_name is not None else ExtType(str(dtype))


def aval_to_type(aval: Any) -> TensorType:
    """The IR tensor type of a JAX aval (tokens and other shapeless avals become ExtType scalars)."""
    shape = getattr(aval, "shape", None)
    dtype = getattr(aval, "dtype", None)
    if shape is None or dtype is None or not all(isinstance(d, int) for d in shape):
        return TensorType(ExtType(str(aval)), ())
    return TensorType(elem_type_of(dtype), tuple(shape))
