"""Constant folding of scalar literals.

Folds an op whose operands are all splat constants (one value for the whole tensor) when NumPy
computes exactly what XLA does: IEEE add/sub/mul/div/sqrt/neg/abs and comparisons in f32/f64,
wrapping integer add/sub/mul, bool logic, exact conversions. Broadcasts and reshapes of splats,
and selects with a constant predicate, fold in any dtype. Transcendentals are left alone: NumPy
and XLA may round them differently.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fusec.ir import DType, Function, Module, Op, Value
from fusec.passes.base import Pass, register_pass
from fusec.passes.rewrite import rewrite_forward

_EXACT_FLOAT = {"f32": np.float32, "f64": np.float64}
_INT = {"i8": np.int8, "i16": np.int16, "i32": np.int32, "i64": np.int64,
        "u8": np.uint8, "u16": np.uint16, "u32": np.uint32, "u64": np.uint64, "bool": np.bool_}

_FLOAT_OPS: dict[str, Callable[..., Any]] = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide, "neg": np.negative,
    "abs": np.abs, "sqrt": np.sqrt, "eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal,
    "gt": np.greater, "ge": np.greater_equal,
}
_INT_OPS: dict[str, Callable[..., Any]] = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "neg": np.negative, "max": np.maximum,
    "min": np.minimum, "eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal,
    "gt": np.greater, "ge": np.greater_equal, "and": np.bitwise_and, "or": np.bitwise_or,
    "xor": np.bitwise_xor, "not": np.invert,
}


def _splat(op: Op | None) -> Any:
    """The scalar value of a splat constant op, else None."""
    if op is None or op.opcode != "constant":
        return None
    value = op.attr("value")
    return None if isinstance(value, tuple) else value


def _numpy_type(elem: Any) -> Any:
    if isinstance(elem, DType):
        return _EXACT_FLOAT.get(elem.name) or _INT.get(elem.name)
    return None


def _to_attr(x: Any) -> Any:
    x = np.asarray(x).reshape(())
    return x.item() if x.dtype.kind in "biu" else float(x)


def _fold_elementwise(op: Op, values: list[Any]) -> Any:
    in_elem = op.operands[0].type.elem
    np_in = _numpy_type(in_elem)
    if np_in is None:
        return None
    if op.opcode == "convert":
        np_out = _numpy_type(op.result.type.elem)
        if np_out is None or (np_in in _EXACT_FLOAT.values() and np_out not in _EXACT_FLOAT.values()):
            return None  # float -> int conversion of out-of-range values differs between backends
        return _to_attr(np.asarray(values[0], np_in).astype(np_out))
    table = _FLOAT_OPS if np_in in _EXACT_FLOAT.values() else _INT_OPS
    fn = table.get(op.opcode)
    if fn is None or (np_in is np.bool_ and op.opcode in ("add", "sub", "mul", "neg")):
        return None
    with np.errstate(all="ignore"):
        result = fn(*(np.asarray(v, np_in) for v in values))
    return _to_attr(result)


def _fold(op: Op, producers: Mapping[str, Op]) -> Op | tuple[Value, ...]:
    values = [_splat(producers.get(v.name)) for v in op.operands]
    if op.opcode == "select" and values[0] is not None:
        return (op.operands[1 + int(values[0])],)  # a constant predicate picks its case
    if not op.operands or any(v is None for v in values) or len(op.results) != 1:
        return op
    if op.opcode in ("broadcast", "reshape"):
        folded = values[0]
    elif op.opcode in ("opaque", "call", "dot", "reduce", "argmax", "argmin", "transpose"):
        return op
    else:
        folded = _fold_elementwise(op, values)
    if folded is None:
        return op
    out = op.result
    return Op.make("constant", (), (out,), value=folded, dtype=str(out.type.elem), shape=out.type.shape)


def fold_function(func: Function) -> Function:
    return rewrite_forward(func, _fold)


@register_pass
@dataclass(frozen=True)
class FoldConstants(Pass):
    name = "fold-constants"

    def run(self, module: Module) -> Module:
        return module.replace_functions([fold_function(f) for f in module.functions])
