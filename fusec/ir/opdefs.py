"""The graph-level op vocabulary: for each opcode, its arity and a rule that infers result types.

Attributes fully determine result types (as a jaxpr equation's params do), so the verifier can
check every declared result type. A rule raises :class:`TypeRuleError` naming the operand at fault.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fusec.ir.types import BOOL, DType, ElemType, LowBitType, TensorType, parse_elem_type


class TypeRuleError(Exception):
    """A type rule failed; ``operand`` is the index of the offending operand, if one is."""

    def __init__(self, message: str, operand: int | None = None) -> None:
        super().__init__(message)
        self.operand = operand


Attrs = dict[str, Any]
Rule = Callable[[list[TensorType], Attrs], list[TensorType]]


@dataclass(frozen=True)
class OpDef:
    """What an opcode takes: operand count bounds, required attributes, and its type rule."""

    opcode: str
    min_operands: int
    max_operands: int | None
    required_attrs: tuple[str, ...]
    rule: Rule | None  # None: result types are whatever the op declares (opaque)
    kind: str  # "elementwise", "shape", "reduce", "contract", "source", "call", "opaque", "constraint"


OPDEFS: dict[str, OpDef] = {}


def _define(opcodes: str, lo: int, hi: int | None, attrs: tuple[str, ...], rule: Rule | None, kind: str) -> None:
    for opcode in opcodes.split():
        OPDEFS[opcode] = OpDef(opcode, lo, hi, attrs, rule, kind)


def _elem(attrs: Attrs, key: str) -> ElemType:
    try:
        return parse_elem_type(str(attrs[key]))
    except ValueError as e:
        raise TypeRuleError(f"attribute {key}: {e}") from None


def _same_types(types: list[TensorType], first: int = 0) -> TensorType:
    ref = types[first]
    for i in range(first + 1, len(types)):
        if types[i] != ref:
            raise TypeRuleError(f"has type {types[i]}, expected {ref} (the type of operand #{first})", i)
    return ref


def _unary(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    return [types[0]]


def _float_unary(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    elem = types[0].elem
    if not (isinstance(elem, DType) and (elem.is_float or elem.is_complex)):
        raise TypeRuleError(f"has type {types[0]}, expected a floating-point tensor", 0)
    return [types[0]]


def _int_unary(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    elem = types[0].elem
    if not (isinstance(elem, DType) and elem.is_int):
        raise TypeRuleError(f"has type {types[0]}, expected an integer tensor", 0)
    return [types[0]]


def _is_finite(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    _float_unary(types, attrs)
    return [types[0].with_elem(BOOL)]


def _binary(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    return [_same_types(types)]


def _compare(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    return [_same_types(types).with_elem(BOOL)]


def _integer_pow(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    if not isinstance(attrs["y"], int) or isinstance(attrs["y"], bool):
        raise TypeRuleError(f"attribute y must be an int, got {attrs['y']!r}")
    return [types[0]]


def _select(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    pred, case = types[0], _same_types(types, 1)
    if pred.elem not in (BOOL, DType("i32")):
        raise TypeRuleError(f"predicate has type {pred}, expected bool or i32", 0)
    if pred.shape not in ((), case.shape):
        raise TypeRuleError(f"predicate shape {list(pred.shape)} is neither scalar nor {list(case.shape)}", 0)
    if pred.elem == BOOL and len(types) > 3:
        raise TypeRuleError("a bool predicate selects between exactly two cases", 0)
    return [case]


def _clamp(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    lo, x, hi = types
    for i, bound in ((0, lo), (2, hi)):
        if bound.elem != x.elem or bound.shape not in ((), x.shape):
            raise TypeRuleError(f"bound has type {bound}, expected {x.elem}[] or {x}", i)
    return [x]


def _convert(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    return [types[0].with_elem(_elem(attrs, "dtype"))]


def _shape_attr(attrs: Attrs, key: str = "shape") -> tuple[int, ...]:
    shape = attrs[key]
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise TypeRuleError(f"attribute {key} must be a list of non-negative ints, got {shape!r}")
    return shape


def _axes_attr(attrs: Attrs, key: str, rank: int) -> tuple[int, ...]:
    axes = attrs[key]
    if not isinstance(axes, tuple) or not all(isinstance(a, int) and 0 <= a < rank for a in axes):
        raise TypeRuleError(f"attribute {key}={list(axes) if isinstance(axes, tuple) else axes!r} "
                            f"must list axes in [0, {rank})")
    if len(set(axes)) != len(axes):
        raise TypeRuleError(f"attribute {key}={list(axes)} repeats an axis")
    return axes


def _broadcast(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    (x,) = types
    shape = _shape_attr(attrs)
    dims = _axes_attr(attrs, "dims", len(shape))
    if len(dims) != x.rank:
        raise TypeRuleError(f"dims={list(dims)} has {len(dims)} entries for an operand of rank {x.rank}", 0)
    if list(dims) != sorted(dims):
        raise TypeRuleError(f"dims={list(dims)} must be increasing")
    for i, d in enumerate(dims):
        if x.shape[i] not in (1, shape[d]):
            raise TypeRuleError(f"dimension {i} of size {x.shape[i]} cannot broadcast to size {shape[d]} "
                                f"at result dimension {d}", 0)
    return [x.with_shape(shape)]


def _reshape(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    (x,) = types
    out = x.with_shape(_shape_attr(attrs))
    if out.size != x.size:
        raise TypeRuleError(f"has {x.size} elements, cannot reshape to {list(out.shape)} ({out.size} elements)", 0)
    return [out]


def _transpose(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    (x,) = types
    perm = attrs["perm"]
    if not isinstance(perm, tuple) or sorted(perm) != list(range(x.rank)):
        raise TypeRuleError(f"perm={perm!r} is not a permutation of the operand's {x.rank} axes")
    return [x.with_shape(tuple(x.shape[p] for p in perm))]


def _slice(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    (x,) = types
    start, limit, strides = attrs["start"], attrs["limit"], attrs["strides"]
    for key, val in (("start", start), ("limit", limit), ("strides", strides)):
        if not isinstance(val, tuple) or len(val) != x.rank or not all(isinstance(v, int) for v in val):
            raise TypeRuleError(f"attribute {key}={val!r} must list {x.rank} ints, one per operand axis")
    shape = []
    for axis, (lo, hi, step, size) in enumerate(zip(start, limit, strides, x.shape)):
        if not (0 <= lo <= hi <= size) or step < 1:
            raise TypeRuleError(f"axis {axis}: slice {lo}:{hi}:{step} does not fit size {size}", 0)
        shape.append((hi - lo + step - 1) // step)
    return [x.with_shape(tuple(shape))]


def _concatenate(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    first = types[0]
    axis = attrs["axis"]
    if not isinstance(axis, int) or not 0 <= axis < first.rank:
        raise TypeRuleError(f"axis={axis!r} is not an axis of rank {first.rank}")
    for i, t in enumerate(types[1:], 1):
        if t.elem != first.elem or t.rank != first.rank or any(
                a != b for d, (a, b) in enumerate(zip(t.shape, first.shape)) if d != axis):
            raise TypeRuleError(f"has type {t}, which does not concatenate with {first} along axis {axis}", i)
    shape = list(first.shape)
    shape[axis] = sum(t.shape[axis] for t in types)
    return [first.with_shape(tuple(shape))]


def _dequantize(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    """A low-bit weight -> floats. Its operands are one value of the low-bit type, or its packed
    planes (u32), scales and, for zero-point formats, zero-points."""
    fmt = _elem(attrs, "format")
    if not isinstance(fmt, LowBitType) or fmt.group is None:
        raise TypeRuleError(f"format={attrs['format']!r} is not a grouped low-bit format such as i3g128")
    if fmt.family == "lut" and len(attrs.get("lut", ())) != 2**fmt.bits:
        raise TypeRuleError(f"a {fmt.bits}-bit lookup table needs {2**fmt.bits} values in attribute lut")
    out = TensorType(_elem(attrs, "dtype"), _shape_attr(attrs))
    if len(types) == 1:  # the weight as one low-bit value
        if types[0] != TensorType(fmt, out.shape):
            raise TypeRuleError(f"has type {types[0]}, expected {TensorType(fmt, out.shape)}", 0)
        return [out]
    n_planes = 1 if fmt.bits == 8 else bin(fmt.bits).count("1")
    want = n_planes + 1 + int(fmt.zero_point)
    if len(types) != want:
        extra = " and zero-points" if fmt.zero_point else ""
        raise TypeRuleError(f"{fmt} takes {n_planes} packed plane(s), scales{extra} ({want} operands), "
                            f"got {len(types)}")
    for i in range(n_planes):
        if types[i].elem != DType("u32"):
            raise TypeRuleError(f"packed plane has type {types[i]}, expected u32 words", i)
    return [out]


def _input_transform(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    """x T along ``axis`` (side "input") or T x (side "weight"), T = diag(scale) . B(block) with B
    block-Hadamard (block 0: none); operand 1, when present, is the [K] scale."""
    x = types[0]
    axis, block, side = attrs["axis"], attrs["block"], attrs["side"]
    if side not in ("input", "weight"):
        raise TypeRuleError(f"side={side!r} is not 'input' or 'weight'")
    if not isinstance(axis, int) or not 0 <= axis < x.rank:
        raise TypeRuleError(f"axis={axis!r} is not an axis of rank {x.rank}", 0)
    k = x.shape[axis]
    if not isinstance(block, int) or block < 0 or block & (block - 1) or (block and k % block):
        raise TypeRuleError(f"block={block!r} is not 0 or a power of two dividing size {k}", 0)
    if not (isinstance(x.elem, DType) and x.elem.is_float):
        raise TypeRuleError(f"has type {x}, expected a floating-point tensor", 0)
    float_vector = len(types) < 2 or (isinstance(types[1].elem, DType) and types[1].elem.is_float)
    if len(types) == 2 and (types[1].shape != (k,) or not float_vector):
        raise TypeRuleError(f"scale has type {types[1]}, expected a float vector [{k}]", 1)
    return [x]


REDUCE_KINDS = ("sum", "prod", "max", "min", "and", "or", "xor")


def _reduce(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    (x,) = types
    if attrs["kind"] not in REDUCE_KINDS:
        raise TypeRuleError(f"kind={attrs['kind']!r} is not one of {REDUCE_KINDS}")
    axes = _axes_attr(attrs, "axes", x.rank)
    return [x.with_shape(tuple(d for i, d in enumerate(x.shape) if i not in axes))]


def _arg_reduce(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    (x,) = types
    (axis,) = _axes_attr(attrs, "axes", x.rank)
    index = _elem(attrs, "index_dtype")
    if not (isinstance(index, DType) and index.is_int):
        raise TypeRuleError(f"index_dtype={index} is not an integer dtype")
    return [TensorType(index, tuple(d for i, d in enumerate(x.shape) if i != axis))]


def _dot(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    """Canonical batched matmul: lhs [B..., M, K] (or [B..., K, M] when lhs_t), rhs [B..., K, N]
    (or [B..., N, K] when rhs_t) -> [B..., M, N]."""
    lhs, rhs = types
    if lhs.rank < 2 or rhs.rank != lhs.rank:
        bad = 0 if lhs.rank < 2 else 1
        raise TypeRuleError(f"dot operands must both have the same rank >= 2, got {lhs} and {rhs}", bad)
    if lhs.shape[:-2] != rhs.shape[:-2]:
        raise TypeRuleError(f"batch dimensions {list(rhs.shape[:-2])} differ from the lhs's "
                            f"{list(lhs.shape[:-2])}", 1)
    m, k = (lhs.shape[-1], lhs.shape[-2]) if attrs["lhs_t"] else lhs.shape[-2:]
    k2, n = (rhs.shape[-1], rhs.shape[-2]) if attrs["rhs_t"] else rhs.shape[-2:]
    if k != k2:
        raise TypeRuleError(f"contracting size {k2} differs from the lhs's {k}", 1)
    if lhs.elem != rhs.elem:
        raise TypeRuleError(f"has element type {rhs.elem}, expected {lhs.elem}", 1)
    return [TensorType(_elem(attrs, "out_dtype"), lhs.shape[:-2] + (m, n))]


def _iota(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    shape = _shape_attr(attrs)
    dim = attrs["dimension"]
    if not isinstance(dim, int) or not 0 <= dim < len(shape):
        raise TypeRuleError(f"dimension={dim!r} is not an axis of shape {list(shape)}")
    return [TensorType(_elem(attrs, "dtype"), shape)]


def _constant(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    out = TensorType(_elem(attrs, "dtype"), _shape_attr(attrs))
    value = attrs["value"]
    if isinstance(value, tuple) and len(value) != out.size:
        raise TypeRuleError(f"holds {len(value)} values for a tensor of {out.size} elements")
    if isinstance(value, str):
        raise TypeRuleError(f"value must be a number, a bool or a list of them, got {value!r}")
    elem = out.elem
    for v in value if isinstance(value, tuple) else (value,):
        if isinstance(elem, DType) and elem.is_bool and not isinstance(v, bool):
            raise TypeRuleError(f"value {v!r} is not a bool, as a {elem} constant needs")
        if isinstance(elem, DType) and elem.is_int and (isinstance(v, float) or isinstance(v, tuple)):
            raise TypeRuleError(f"value {v!r} is not an integer, as a {elem} constant needs")
    return [out]


ELEMENTWISE_FLOAT = (
    "exp exp2 log log1p expm1 tanh logistic sin cos tan asin acos atan sinh cosh asinh acosh atanh "
    "sqrt rsqrt cbrt erf erfc erf_inv lgamma digamma floor ceil round"
)
ELEMENTWISE_ANY = "neg abs sign not square stop_gradient"
ELEMENTWISE_BINARY = (
    "add sub mul div rem pow max min atan2 and or xor shift_left shift_right_logical "
    "shift_right_arithmetic nextafter"
)
COMPARISONS = "eq ne lt le gt ge"

_define(ELEMENTWISE_FLOAT, 1, 1, (), _float_unary, "elementwise")
_define(ELEMENTWISE_ANY, 1, 1, (), _unary, "elementwise")
_define("population_count clz", 1, 1, (), _int_unary, "elementwise")
_define("is_finite", 1, 1, (), _is_finite, "elementwise")
_define(ELEMENTWISE_BINARY, 2, 2, (), _binary, "elementwise")
_define(COMPARISONS, 2, 2, (), _compare, "elementwise")
_define("integer_pow", 1, 1, ("y",), _integer_pow, "elementwise")
_define("select", 3, None, (), _select, "elementwise")
_define("clamp", 3, 3, (), _clamp, "elementwise")
_define("convert", 1, 1, ("dtype",), _convert, "elementwise")
_define("broadcast", 1, 1, ("shape", "dims"), _broadcast, "shape")
_define("reshape", 1, 1, ("shape",), _reshape, "shape")
_define("transpose", 1, 1, ("perm",), _transpose, "shape")
_define("slice", 1, 1, ("start", "limit", "strides"), _slice, "shape")
_define("concatenate", 1, None, ("axis",), _concatenate, "shape")
_define("reduce", 1, 1, ("kind", "axes"), _reduce, "reduce")
_define("argmax argmin", 1, 1, ("axes", "index_dtype"), _arg_reduce, "reduce")
_define("dot", 2, 2, ("lhs_t", "rhs_t", "out_dtype"), _dot, "contract")
_define("dequantize", 1, None, ("format", "shape", "dtype"), _dequantize, "dequantize")
_define("input_transform", 1, 2, ("block", "axis", "side"), _input_transform, "transform")
_define("iota", 0, 0, ("dtype", "shape", "dimension"), _iota, "source")
_define("constant", 0, 0, ("value", "dtype", "shape"), _constant, "source")
_define("call", 0, None, ("callee",), None, "call")
_define("kernel", 0, None, ("callee", "kind", "space"), None, "call")
_define("opaque", 0, None, ("primitive", "ref"), None, "opaque")
# ``ref`` names the sharding object in the module's externals; ``spec`` spells it for readers.
_define("sharding_constraint", 1, 1, ("ref",), _unary, "constraint")


def infer_result_types(opcode: str, operand_types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    """Result types of ``opcode`` applied to ``operand_types`` with ``attrs``; raises TypeRuleError."""
    opdef = OPDEFS.get(opcode)
    if opdef is None:
        raise TypeRuleError(f"unknown opcode {opcode!r}")
    n = len(operand_types)
    if n < opdef.min_operands or (opdef.max_operands is not None and n > opdef.max_operands):
        want = (str(opdef.min_operands) if opdef.max_operands == opdef.min_operands
                else f"{opdef.min_operands}..{opdef.max_operands if opdef.max_operands is not None else ''}")
        raise TypeRuleError(f"takes {want} operands, got {n}")
    missing = [a for a in opdef.required_attrs if a not in attrs]
    if missing:
        raise TypeRuleError(f"is missing attribute(s) {', '.join(missing)}")
    if opdef.rule is None:
        raise TypeRuleError(f"{opcode!r} has no type rule; its result types are declared")
    return opdef.rule(operand_types, attrs)
