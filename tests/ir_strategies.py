"""Hypothesis strategies for random, well-formed IR modules."""

from __future__ import annotations

import math

from hypothesis import strategies as st

from fusec.ir import Builder, DType, LowBitType, Module, TensorType, Value
from fusec.ir.opdefs import COMPARISONS

FLOAT_UNARY = ["exp", "tanh", "logistic", "sin", "abs", "neg", "sqrt", "floor", "erf", "square", "log1p"]
FLOAT_BINARY = ["add", "sub", "mul", "div", "max", "min", "pow"]
INT_BINARY = ["add", "sub", "mul", "max", "min", "and", "or", "xor"]
DTYPES = ["f32", "bf16", "f16", "i32", "u8", "bool"]


def _is_float(v: Value) -> bool:
    return isinstance(v.type.elem, DType) and v.type.elem.is_float


def _is_int(v: Value) -> bool:
    return isinstance(v.type.elem, DType) and (v.type.elem.is_int or v.type.elem.is_bool)


shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)
low_bit_types = st.one_of(
    st.tuples(st.sampled_from(["int", "uint", "nf", "lut"]), st.integers(1, 8), st.sampled_from([None, 0, 32, 128]),
              st.booleans(), st.booleans())
    # An unscaled int2/int4/int8 is the standard dtype, not a low-bit format.
    .filter(lambda a: not (a[0] in ("int", "uint") and a[2] is None and not a[3] and a[1] in (2, 4, 8)))
    .map(lambda a: LowBitType(a[0], a[1], group=a[2], zero_point=a[3],
                              packing="pairs" if a[4] and a[1] == 3 else "planes")),
    st.builds(lambda em, g: LowBitType("float", 1 + em[0] + em[1], exp_bits=em[0], group=g),
              st.sampled_from([(2, 1), (3, 2), (2, 3), (4, 3), (5, 2)]), st.sampled_from([None, 32])),
)
scalar_values = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-5, 5))


@st.composite
def modules(draw: st.DrawFn, executable: bool = False, max_ops: int = 14) -> Module:
    """A random module; ``executable`` keeps to standard dtypes and ops the XLA backend runs."""
    b = Builder("main")
    values: list[Value] = []
    for i in range(draw(st.integers(1, 3))):
        values.append(b.param(TensorType(DType(draw(st.sampled_from(DTYPES))), draw(shapes)), f"p{i}"))
    if not executable and draw(st.booleans()):
        values.append(b.param(TensorType(draw(low_bit_types), (4, 128)), "w"))
    for _ in range(draw(st.integers(0, max_ops))):
        std = [v for v in values if isinstance(v.type.elem, DType)]
        x = draw(st.sampled_from(std))
        kind = draw(st.sampled_from(["unary", "binary", "compare", "convert", "broadcast", "reshape", "transpose",
                                     "reduce", "constant", "iota", "select", "slice", "dot", "opaque", "concat"]))
        if kind == "unary" and _is_float(x):
            values.append(b.op(draw(st.sampled_from(FLOAT_UNARY)), [x]))
        elif kind in ("binary", "compare"):
            same = [v for v in std if v.type == x.type]
            y = draw(st.sampled_from(same))
            if kind == "compare":
                values.append(b.op(draw(st.sampled_from(COMPARISONS.split())), [x, y]))
            elif _is_float(x):
                values.append(b.op(draw(st.sampled_from(FLOAT_BINARY)), [x, y]))
            elif x.type.elem == DType("bool"):
                values.append(b.op(draw(st.sampled_from(["and", "or", "xor"])), [x, y]))
            else:
                values.append(b.op(draw(st.sampled_from(INT_BINARY)), [x, y]))
        elif kind == "convert":
            values.append(b.op("convert", [x], dtype=draw(st.sampled_from(DTYPES))))
        elif kind == "broadcast" and x.type.rank < 3:
            pos = draw(st.integers(0, x.type.rank))
            shape = x.type.shape[:pos] + (draw(st.integers(1, 3)),) + x.type.shape[pos:]
            dims = tuple(d if d < pos else d + 1 for d in range(x.type.rank))
            values.append(b.op("broadcast", [x], shape=shape, dims=dims))
        elif kind == "reshape":
            values.append(b.op("reshape", [x], shape=(x.type.size,)))
        elif kind == "transpose" and x.type.rank >= 1:
            perm = draw(st.permutations(range(x.type.rank)))
            values.append(b.op("transpose", [x], perm=tuple(perm)))
        elif kind == "reduce" and x.type.rank >= 1:
            axes = draw(st.lists(st.integers(0, x.type.rank - 1), min_size=1, unique=True))
            red = draw(st.sampled_from(["sum", "max", "min"] if not x.type.elem == DType("bool") else ["and", "or"]))
            values.append(b.op("reduce", [x], kind=red, axes=tuple(axes)))
        elif kind == "constant":
            dt = draw(st.sampled_from(["f32", "i32", "bool"]))
            shape = draw(shapes)
            if dt == "f32":
                value = float(draw(scalar_values))
            elif dt == "i32":
                value = int(draw(st.integers(-100, 100)))
            else:
                value = draw(st.booleans())
            if draw(st.booleans()) and dt == "f32":
                value = tuple(float(draw(st.floats(-4, 4, width=32))) for _ in range(math.prod(shape)))
            values.append(b.op("constant", (), value=value, dtype=dt, shape=shape))
        elif kind == "iota":
            shape = draw(shapes.filter(lambda s: len(s) > 0))
            values.append(b.op("iota", (), dtype="i32", shape=shape, dimension=draw(st.integers(0, len(shape) - 1))))
        elif kind == "select":
            pred = [v for v in std if v.type == x.type.with_elem(DType("bool"))]
            if pred:
                y = draw(st.sampled_from([v for v in std if v.type == x.type]))
                values.append(b.op("select", [draw(st.sampled_from(pred)), x, y]))
        elif kind == "slice" and x.type.rank >= 1:
            start = tuple(draw(st.integers(0, d - 1)) for d in x.type.shape)
            limit = tuple(draw(st.integers(s + 1, d)) for s, d in zip(start, x.type.shape))
            strides = tuple(draw(st.integers(1, 2)) for _ in x.type.shape)
            values.append(b.op("slice", [x], start=start, limit=limit, strides=strides))
        elif kind == "concat" and x.type.rank >= 1:
            same = [v for v in std if v.type == x.type]
            axis = draw(st.integers(0, x.type.rank - 1))
            values.append(b.op("concatenate", [x, draw(st.sampled_from(same))], axis=axis))
        elif kind == "dot" and _is_float(x) and x.type.rank == 2:
            m, k = x.type.shape
            n = draw(st.integers(1, 3))
            rhs_t = draw(st.booleans())
            w = b.param(TensorType(x.type.elem, (n, k) if rhs_t else (k, n)), f"w{len(b.params)}")
            values.append(b.op("dot", [x, w], lhs_t=False, rhs_t=rhs_t, out_dtype="f32"))
        elif kind == "opaque" and not executable:
            types = [TensorType(DType("f32") if draw(st.booleans()) else draw(low_bit_types), draw(shapes))
                     for _ in range(draw(st.integers(0, 2)))]
            values.extend(b.op_multi("opaque", [x], result_types=types, primitive="mystery",
                                     ref=f"r{len(b.ops)}", effects=draw(st.booleans())))
    n_ret = draw(st.integers(1, min(3, len(values))))
    returns = draw(st.lists(st.sampled_from(values), min_size=n_ret, max_size=n_ret))
    return Module((b.finish(returns),))
