"""Triton dtype names and literals in generated kernel source."""

from __future__ import annotations

import math
import struct

from fusec.errors import Unsupported
from fusec.ir import DType, TensorType

TL_DTYPES = {"f32": "tl.float32", "bf16": "tl.bfloat16", "f16": "tl.float16", "f64": "tl.float64",
             "i8": "tl.int8", "i16": "tl.int16", "i32": "tl.int32", "i64": "tl.int64", "u8": "tl.uint8",
             "u16": "tl.uint16", "u32": "tl.uint32", "u64": "tl.uint64", "bool": "tl.int1"}
NARROW_FLOATS = ("bf16", "f16")  # computed in float32: the interpreter stores bf16 as raw uint16 bits


def elem_name(t: TensorType) -> str:
    elem = t.elem
    if not isinstance(elem, DType) or elem.name not in TL_DTYPES:
        raise Unsupported(f"the Triton backend has no dtype for {t}")
    return elem.name


def tl_dtype(t: TensorType) -> str:
    return TL_DTYPES[elem_name(t)]


def is_narrow(t: TensorType) -> bool:
    return isinstance(t.elem, DType) and t.elem.name in NARROW_FLOATS


def shape_text(shape: tuple[int, ...]) -> str:
    return "(" + "".join(f"{d}, " for d in shape) + ")"


def float_value(value: object, dtype: str, shape: tuple[int, ...]) -> str:
    """A float tile of ``value``: a literal when finite, else its float32 bit pattern (Triton source
    has no way to spell inf or NaN, and the bit pattern keeps NaN's sign)."""
    v = float(value)  # type: ignore[arg-type]
    if math.isfinite(v):
        return f"tl.full({shape_text(shape)}, {v!r}, {dtype})"
    bits = struct.unpack("<I", struct.pack("<f", v))[0]
    f32 = f"tl.full({shape_text(shape)}, {bits}, tl.uint32).to(tl.float32, bitcast=True)"
    return f32 if dtype == "tl.float32" else f"{f32}.to({dtype})"


def constant_value(value: object, t: TensorType) -> str:
    """A tile of type ``t`` filled with ``value``."""
    name = elem_name(t)
    dtype = TL_DTYPES[name]
    if name == "bool":
        return f"tl.full({shape_text(t.shape)}, {bool(value)!r}, tl.int1)"
    if isinstance(t.elem, DType) and t.elem.is_float:
        return float_value(value, dtype, t.shape)
    return f"tl.full({shape_text(t.shape)}, {int(value)}, {dtype})"  # type: ignore[call-overload]


def pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0
