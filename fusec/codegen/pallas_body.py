"""Python source for the body of a Pallas kernel: one emitter per IR op, on blocks.

Values inside a kernel are blocks of the iteration space ("full", the block shape less squeezed
dimensions) or of its rows ("row", the same without the last dimension). bfloat16/float16
arithmetic is done in float32 and rounded back, as XLA does on CPU and as Triton needs for many ops.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from fusec.codegen.pallas_special import SPECIAL_FUNCTIONS
from fusec.errors import FusecError
from fusec.ir import DType, Op, Value
from fusec.passes.views import space_block_dims

_LAX_UNARY = {
    "neg": "lax.neg", "exp": "lax.exp", "exp2": "lax.exp2", "log": "lax.log", "log1p": "lax.log1p",
    "expm1": "lax.expm1", "tanh": "lax.tanh", "logistic": "lax.logistic", "sin": "lax.sin", "cos": "lax.cos",
    "tan": "lax.tan", "asin": "lax.asin", "acos": "lax.acos", "atan": "lax.atan", "sinh": "lax.sinh",
    "cosh": "lax.cosh", "asinh": "lax.asinh", "acosh": "lax.acosh", "atanh": "lax.atanh", "sqrt": "lax.sqrt",
    "rsqrt": "lax.rsqrt", "cbrt": "lax.cbrt", "erf_inv": "lax.erf_inv", "floor": "lax.floor", "ceil": "lax.ceil",
    "abs": "lax.abs", "sign": "lax.sign", "not": "lax.bitwise_not", "square": "lax.square",
    "is_finite": "lax.is_finite",
}
_LAX_BINARY = {
    "add": "lax.add", "sub": "lax.sub", "mul": "lax.mul", "div": "lax.div", "rem": "lax.rem", "pow": "lax.pow",
    "max": "lax.max", "min": "lax.min", "atan2": "lax.atan2", "and": "lax.bitwise_and", "or": "lax.bitwise_or",
    "xor": "lax.bitwise_xor", "nextafter": "lax.nextafter", "eq": "lax.eq", "ne": "lax.ne", "lt": "lax.lt",
    "le": "lax.le", "gt": "lax.gt", "ge": "lax.ge",
}
# Never widened: exact in any float width (no rounding), or, for nextafter, defined by the format
# itself (float32's neighbour rounds back to the input); its helper works on 16-bit floats directly.
_EXACT = frozenset({"neg", "abs", "sign", "max", "min", "eq", "ne", "lt", "le", "gt", "ge", "is_finite", "floor",
                    "ceil", "nextafter"})
_REDUCE = {"sum": ("jnp.sum", "0"), "prod": ("jnp.prod", "1"), "max": ("jnp.max", None), "min": ("jnp.min", None)}


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


@dataclass
class KernelLayout:
    """How the iteration space maps onto blocks and the grid."""

    space: tuple[int, ...]
    block: tuple[int, ...]
    squeeze: tuple[int, ...]
    bk: int | None = None

    @property
    def full_shape(self) -> tuple[int, ...]:
        return tuple(b for d, b in enumerate(self.block) if d not in self.squeeze)

    def value_axis(self, d: int) -> int:
        """Position of space dimension ``d`` in a full block value."""
        return d - sum(1 for s in self.squeeze if s < d)

    def is_row(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.space) - 1

    def value_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of a value of IR ``shape`` inside the kernel (squeezed dimensions dropped)."""
        dims = space_block_dims(self.space, self.block, self.squeeze, shape)
        return tuple(b for b, _ in dims if b is not None)


@dataclass
class BodyWriter:
    layout: KernelLayout
    lines: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)

    def name(self, v: Value) -> str:
        if v.name not in self.names:
            base = "v_" + re.sub(r"\W", "_", v.name)
            ident = base
            n = 0
            while ident in self.names.values():
                n += 1
                ident = f"{base}_{n}"
            self.names[v.name] = ident
        return self.names[v.name]

    def shape_of(self, v: Value) -> tuple[int, ...]:
        return self.layout.value_shape(v.type.shape)

    def emit(self, op: Op) -> None:
        emitter = EMITTERS.get(op.opcode)
        if emitter is None:
            raise FusecError(f"the Pallas backend cannot put op {op.opcode!r} in a kernel")
        expr = emitter(self, op, [self.name(v) for v in op.operands])
        self.lines.append(f"{self.name(op.result)} = {expr}  # {op.result.name}: {op.result.type}")


Emitter = Callable[[BodyWriter, Op, list[str]], str]
EMITTERS: dict[str, Emitter] = {}


def _widened(op: Op, call: str, args: list[str]) -> str:
    elem = op.operands[0].type.elem
    if isinstance(elem, DType) and elem.name in ("bf16", "f16") and op.opcode not in _EXACT:
        out = jnp_dtype(op.result)
        inner = ", ".join(f"{a}.astype(jnp.float32)" for a in args)
        result = f"{call}({inner})"
        return result if op.result.type.elem.name == "bool" else f"{result}.astype({out})"
    return f"{call}({', '.join(args)})"


for _op, _fn in {**_LAX_UNARY, **_LAX_BINARY, **SPECIAL_FUNCTIONS}.items():
    EMITTERS[_op] = (lambda fn: lambda w, op, a: _widened(op, fn, a))(_fn)

EMITTERS["stop_gradient"] = lambda w, op, a: a[0]
EMITTERS["integer_pow"] = lambda w, op, a: _widened(op, f"(lambda x: lax.integer_pow(x, {op.attr('y')}))", a)
EMITTERS["select"] = lambda w, op, a: f"jnp.where({a[0]}, {a[2]}, {a[1]})"
EMITTERS["clamp"] = lambda w, op, a: f"lax.clamp({a[0]}, {a[1]}, {a[2]})"
EMITTERS["convert"] = lambda w, op, a: f"{a[0]}.astype({jnp_dtype(op.result)})"


def _shift(op: Op, a: list[str]) -> str:
    # XLA defines shifts by >= the bit width; a GPU shift by the full width is poison, so clamp.
    bits = op.operands[0].type.elem.bits  # type: ignore[union-attr]
    amount = f"jnp.minimum({a[1]}.astype(jnp.uint32), {bits - 1}).astype({a[1]}.dtype)"
    fn = {"shift_left": "lax.shift_left", "shift_right_logical": "lax.shift_right_logical",
          "shift_right_arithmetic": "lax.shift_right_arithmetic"}[op.opcode]
    shifted = f"{fn}({a[0]}, {amount})"
    if op.opcode == "shift_right_arithmetic":
        return shifted
    return f"jnp.where({a[1]}.astype(jnp.uint32) < {bits}, {shifted}, jnp.zeros_like({a[0]}))"


for _op in ("shift_left", "shift_right_logical", "shift_right_arithmetic"):
    EMITTERS[_op] = lambda w, op, a: _shift(op, a)


def _broadcast(w: BodyWriter, op: Op, a: list[str]) -> str:
    src, target = op.operands[0], w.shape_of(op.result)
    if w.layout.is_row(src.type.shape) and not w.layout.is_row(op.result.type.shape):
        return f"jnp.broadcast_to({a[0]}[..., None], {target})"
    return f"jnp.broadcast_to({a[0]}, {target})"


EMITTERS["broadcast"] = _broadcast


def _reduce(w: BodyWriter, op: Op, a: list[str]) -> str:
    fn, identity = _REDUCE[str(op.attr("kind"))]
    x = a[0]
    elem = op.operands[0].type.elem
    wide = isinstance(elem, DType) and elem.name in ("bf16", "f16")
    if wide:
        x = f"{x}.astype(jnp.float32)"
    if w.layout.space[-1] != w.layout.block[-1]:  # mask the padding of a partial row
        if identity is None:
            is_max = op.attr("kind") == "max"
            if isinstance(elem, DType) and elem.is_float:
                identity = '-float("inf")' if is_max else 'float("inf")'
            else:
                # Typed: a Python int such as uint32's max overflows where jnp.where takes it as int32.
                dt = jnp_dtype(op.operands[0])
                identity = f"{dt}(jnp.iinfo({dt}).{'min' if is_max else 'max'})"
        x = f"jnp.where(_cols < {w.layout.space[-1]}, {x}, {identity})"
    out = f"{fn}({x}, axis=-1)"
    if op.attr("kind") in ("max", "min") and isinstance(elem, DType) and elem.is_float:
        # XLA's max/min propagate NaN; Triton's row reductions and XLA:CPU's vectorised ones (rows
        # of 32, say) may drop it, so a row holding a NaN is made NaN explicitly.
        # (A count, not jnp.any: Pallas-Triton has no reduce_or.)
        out = f"jnp.where(jnp.sum(jnp.where({x} != {x}, 1, 0), axis=-1) > 0, jnp.nan, {out})"
    return f"{out}.astype({jnp_dtype(op.result)})" if wide else out


EMITTERS["reduce"] = _reduce


def _constant(w: BodyWriter, op: Op, a: list[str]) -> str:
    return f"jnp.full({w.shape_of(op.result)}, {literal(op.attr('value'))}, {jnp_dtype(op.result)})"


def _iota(w: BodyWriter, op: Op, a: list[str]) -> str:
    d = int(op.attr("dimension"))
    shape, dt = w.shape_of(op.result), jnp_dtype(op.result)
    if op.result.type.shape[d] == 1:
        return f"jnp.zeros({shape}, {dt})"
    if d in w.layout.squeeze:
        return f"jnp.full({shape}, pl.program_id({d}), {dt})"
    offset = f"pl.program_id({d}) * {w.layout.block[d]}"
    return f"(lax.broadcasted_iota(jnp.int32, {shape}, {w.layout.value_axis(d)}) + {offset}).astype({dt})"


EMITTERS["constant"] = _constant
EMITTERS["iota"] = _iota


def write_body(w: BodyWriter, ops: list[Op]) -> None:
    """Emits every op (dots are emitted by the caller, which owns the K loop)."""
    for op in ops:
        w.emit(op)
