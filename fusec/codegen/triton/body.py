"""Triton source for the ops of a tile program, one emitter per opcode.

Elementwise ops come from one table (opcode -> Triton operator, ``tl`` function or ``libdevice``
function); bfloat16/float16 arithmetic is done in float32 and rounded back, as the Pallas writer
does (and because the Triton interpreter keeps bfloat16 as raw 16-bit integers, so it can only
load, store, convert and select them). Loads, stores and loops are written by the kernel writer
(source.py), which knows the arrays. An op the writer cannot express raises ``Unsupported``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fusec.codegen.source_writer import SourceWriter
from fusec.codegen.triton.text import constant_value, float_value, is_narrow, pow2, shape_text, tl_dtype
from fusec.codegen.triton.unpack import unpack_lines, unpack_pair_lines
from fusec.errors import Unsupported
from fusec.ir import DType, Op, TensorType, Value
from fusec.ir.types import I32

# Python operators Triton overloads on tensors and scalars alike.
_INFIX = {"add": "+", "sub": "-", "mul": "*", "and": "&", "or": "|", "xor": "^",
          "eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
# Functions of ``tl`` (both backends, the interpreter included).
_TL = {"exp": "tl.exp", "exp2": "tl.exp2", "log": "tl.log", "sin": "tl.sin", "cos": "tl.cos", "sqrt": "tl.sqrt_rn",
       "floor": "tl.floor", "ceil": "tl.ceil", "abs": "tl.abs", "erf": "tl.erf"}
# CUDA's libdevice (the interpreter gets NumPy stand-ins: fusec/codegen/triton/interpret_math.py).
_LIBDEVICE = {"tanh": "tanh", "log1p": "log1p", "expm1": "expm1", "tan": "tan", "asin": "asin", "acos": "acos",
              "atan": "atan", "sinh": "sinh", "cosh": "cosh", "asinh": "asinh", "acosh": "acosh", "atanh": "atanh",
              "rsqrt": "rsqrt", "cbrt": "cbrt", "erfc": "erfc", "erf_inv": "erfinv", "lgamma": "lgamma",
              "round": "round", "pow": "pow", "atan2": "atan2", "nextafter": "nextafter"}
# Reductions as tl.reduce with Triton's own combine functions (what tl.sum/max/min use): the
# interpreter runs those by NumPy (any other combine function element by element), and the
# standard library's @jit wrappers cannot be called from a kernel loaded in interpreter mode.
_REDUCE = {"sum": "tl.standard._sum_combine", "max": "tl.standard._elementwise_max",
           "min": "tl.standard._elementwise_min", "prod": "_fusec_mul"}


@dataclass
class BodyWriter(SourceWriter):
    """Identifiers of a tile program's values, and the lines written so far."""

    helpers: set[str] = field(default_factory=set)  # prelude helpers the kernel calls
    grid: tuple[int, ...] = ()  # the launch grid (more than 3 axes are folded into axis 0)
    indent: str = "    "

    def program_id(self, axis: int) -> str:
        if len(self.grid) <= 3:
            return f"tl.program_id({axis})"
        inner = 1
        for g in self.grid[axis + 1:]:
            inner *= g
        return f"((tl.program_id(0) // {inner}) % {self.grid[axis]})"

    def index(self, v: Value) -> str:
        return self.index_name(v)

    def emit(self, op: Op) -> None:
        emitter = EMITTERS.get(op.opcode)
        if emitter is None:
            raise Unsupported(f"the Triton backend cannot put op {op.opcode!r} in a kernel")
        expr = emitter(self, op, [self.index(v) for v in op.operands])
        self.line(f"{self.name(op.result)} = {expr}  # {op.result.name}: {op.result.type}")


Emitter = Callable[[BodyWriter, Op, list[str]], str]
EMITTERS: dict[str, Emitter] = {}


def _widened(op: Op, expr: Callable[[list[str]], str], a: list[str]) -> str:
    """``expr`` of the operands, computed in float32 when they are 16-bit floats."""
    if not any(is_narrow(v.type) for v in op.operands):
        return expr(a)
    wide = [f"{x}.to(tl.float32)" if is_narrow(v.type) else x for x, v in zip(a, op.operands)]
    out = expr(wide)
    return out if not is_narrow(op.result.type) else f"({out}).to({tl_dtype(op.result.type)})"


def _elementwise(expr: Callable[[Op, list[str]], str]) -> Emitter:
    return lambda w, op, a: _widened(op, lambda b: expr(op, b), a)


def _libdevice(fn: str) -> Callable[[Op, list[str]], str]:
    def expr(op: Op, a: list[str]) -> str:
        elem = op.operands[0].type.elem
        if fn == "nextafter" and is_narrow(op.operands[0].type):
            raise Unsupported("the Triton backend has no 16-bit nextafter")
        if isinstance(elem, DType) and not elem.is_float and fn not in ("round",):
            raise Unsupported(f"the Triton backend computes {op.opcode} on floats only, not {elem}")
        return f"libdevice.{fn}({', '.join(a)})"
    return expr


for _op, _sym in _INFIX.items():
    EMITTERS[_op] = _elementwise(lambda op, a, s=_sym: f"({a[0]} {s} {a[1]})")
for _op, _fn in _TL.items():
    EMITTERS[_op] = _elementwise(lambda op, a, f=_fn: f"{f}({a[0]})")
for _op, _fn in _LIBDEVICE.items():
    EMITTERS[_op] = _elementwise(_libdevice(_fn))


def _is_int(v: Value) -> bool:
    return isinstance(v.type.elem, DType) and (v.type.elem.is_int or v.type.elem.is_unsigned)


def _div(op: Op, a: list[str]) -> str:
    # Integer division truncates, as lax.div does (Triton's // on integers is C division).
    return f"({a[0]} // {a[1]})" if _is_int(op.operands[0]) else f"({a[0]} / {a[1]})"


def _rem(op: Op, a: list[str]) -> str:
    # C remainder (the dividend's sign) for integers and floats alike, as lax.rem.
    return f"({a[0]} % {a[1]})" if _is_int(op.operands[0]) else f"libdevice.fmod({a[0]}, {a[1]})"


def _minmax(fn: str) -> Callable[[Op, list[str]], str]:
    def expr(op: Op, a: list[str]) -> str:
        elem = op.operands[0].type.elem
        nan = ", propagate_nan=tl.PropagateNan.ALL" if isinstance(elem, DType) and elem.is_float else ""
        return f"{fn}({a[0]}, {a[1]}{nan})"
    return expr


def _not(op: Op, a: list[str]) -> str:
    return f"({a[0]} == 0)" if str(op.operands[0].type.elem) == "bool" else f"(~{a[0]})"


def _sign(op: Op, a: list[str]) -> str:
    x = a[0]
    if _is_int(op.operands[0]):
        return f"tl.where({x} > 0, 1, tl.where({x} < 0, -1, 0)).to({tl_dtype(op.operands[0].type)})"
    return f"tl.where({x} > 0, 1.0, tl.where({x} < 0, -1.0, {x}))"  # +-0 and NaN are their own sign


def _is_finite(op: Op, a: list[str]) -> str:
    big = 1.7976931348623157e308 if str(op.operands[0].type.elem) == "f64" else 3.4028234663852886e38
    return f"(({a[0]} == {a[0]}) & (tl.abs({a[0]}) <= {big!r}))"


def _integer_pow(op: Op, a: list[str]) -> str:
    # Square-and-multiply, as XLA expands integer_pow.
    y = int(op.attr("y"))
    acc, base, n = None, a[0], abs(y)
    while n:
        if n & 1:
            acc = base if acc is None else f"({acc} * {base})"
        n >>= 1
        if n:
            base = f"({base} * {base})"
    assert acc is not None  # y == 0 is the constant 1 (even for inf and NaN, as XLA has it)
    return f"(1.0 / {acc})" if y < 0 else acc


EMITTERS.update({
    "div": _elementwise(_div), "rem": _elementwise(_rem), "max": _elementwise(_minmax("tl.maximum")),
    "min": _elementwise(_minmax("tl.minimum")), "neg": _elementwise(lambda op, a: f"(-{a[0]})"),
    "not": _elementwise(_not), "sign": _elementwise(_sign), "square": _elementwise(lambda op, a: f"({a[0]} * {a[0]})"),
    "is_finite": _elementwise(_is_finite),
    "integer_pow": lambda w, op, a: constant_value(1, op.result.type) if int(op.attr("y")) == 0 else
    _widened(op, lambda b: _integer_pow(op, b), a),
    "clamp": _elementwise(lambda op, a: f"tl.minimum(tl.maximum({a[1]}, {a[0]}), {a[2]})"),
    "stop_gradient": lambda w, op, a: a[0], "logistic": _elementwise(lambda op, a: f"(1.0 / (1.0 + tl.exp(-{a[0]})))"),
})


def _shift(w: BodyWriter, op: Op, a: list[str]) -> str:
    # XLA defines shifts by >= the bit width; a GPU shift by the full width is poison, so clamp.
    elem = op.operands[0].type.elem
    assert isinstance(elem, DType)
    bits = elem.bits
    amount = f"tl.minimum({a[1]}.to(tl.uint32), {bits - 1}).to({tl_dtype(op.operands[1].type)})"
    x = a[0]
    if op.opcode == "shift_left":
        shifted = f"({x} << {amount})"
    elif op.opcode == "shift_right_arithmetic" or elem.is_unsigned:
        shifted = f"({x} >> {amount})"  # >> is arithmetic on signed and logical on unsigned types
    else:
        unsigned = tl_dtype(op.operands[0].type).replace("tl.int", "tl.uint")
        shifted = f"({x}.to({unsigned}, bitcast=True) >> {amount}.to({unsigned})).to({tl_dtype(op.result.type)}, " \
                  "bitcast=True)"
    if op.opcode == "shift_right_arithmetic":
        return shifted
    return f"tl.where({a[1]}.to(tl.uint32) < {bits}, {shifted}, 0).to({tl_dtype(op.result.type)})"


for _op in ("shift_left", "shift_right_logical", "shift_right_arithmetic"):
    EMITTERS[_op] = _shift


def _select(w: BodyWriter, op: Op, a: list[str]) -> str:
    return f"tl.where({a[0]}, {a[2]}, {a[1]})"  # bit patterns: a select never rounds


def _convert(w: BodyWriter, op: Op, a: list[str]) -> str:
    src, dst = op.operands[0].type, op.result.type
    if str(dst.elem) == "bool":
        return f"({a[0]} != 0)"
    return convert(a[0], src, dst)


def convert(x: str, src: TensorType, dst: TensorType) -> str:
    """``x`` of type ``src`` converted to ``dst``'s element type. A 16-bit float converts through
    float32 (exact) unless the other side is float32: the interpreter converts only f32 <-> bf16."""
    if src.elem == dst.elem:
        return x
    if (is_narrow(src) or is_narrow(dst)) and "f32" not in (str(src.elem), str(dst.elem)):
        return f"{x}.to(tl.float32).to({tl_dtype(dst)})"
    return f"{x}.to({tl_dtype(dst)})"


def expand(x: str, rank: int, keep: list[int]) -> str:
    """``x`` (of rank ``len(keep)``) with size-1 axes inserted, its axes landing on ``keep``."""
    if len(keep) == rank:
        return x
    return f"{x}[{', '.join(':' if d in keep else 'None' for d in range(rank))}]"


def _broadcast(w: BodyWriter, op: Op, a: list[str]) -> str:
    shape = tuple(op.attr("shape"))
    dims = list(op.attr("dims"))
    if not op.operands[0].type.shape:
        return f"({a[0]} + tl.full({shape_text(shape)}, 0, {tl_dtype(op.result.type)}))"
    if op.operands[0].type.shape == shape:
        return a[0]
    return f"tl.broadcast_to({expand(a[0], len(shape), dims)}, {shape_text(shape)})"


def _over(combine: str, x: str, axes: list[int]) -> str:
    """``x`` reduced by ``combine`` over each of ``axes`` in turn, the highest first (Triton
    reduces one axis at a time)."""
    for axis in sorted(axes, reverse=True):
        x = f"tl.reduce({x}, {axis}, {combine})"
    return x


def _reduce(w: BodyWriter, op: Op, a: list[str]) -> str:
    kind = str(op.attr("kind"))
    axes = list(op.attr("axes"))
    x = a[0]
    src = op.operands[0].type
    if is_narrow(src):
        x = f"{x}.to(tl.float32)"
    if kind not in _REDUCE:
        raise Unsupported(f"the Triton backend has no {kind!r} reduction")
    if kind == "prod":
        w.helpers.add("_fusec_mul")
    out = _over(_REDUCE[kind], x, axes)
    if kind in ("max", "min") and isinstance(src.elem, DType) and src.elem.is_float:
        # XLA's max/min propagate NaN; Triton's reductions may drop it, so a row holding one is NaN.
        nans = _over(_REDUCE["sum"], f"tl.where({x} != {x}, 1, 0)", axes)
        out = f"tl.where({nans} > 0, {float_value(float('nan'), 'tl.float32', op.result.type.shape)}, {out})"
    # Sums of small integers come back as int32, narrow floats were widened: back to the IR's type.
    return f"({out}).to({tl_dtype(op.result.type)})"


def _constant(w: BodyWriter, op: Op, a: list[str]) -> str:
    t = op.result.type
    if t.shape == () and str(t.elem) == "i32":
        w.consts[op.result.name] = int(op.attr("value"))
        return str(int(op.attr("value")))
    if t.shape == ():
        raise Unsupported(f"the Triton backend has no scalar constants of type {t}")
    return constant_value(op.attr("value"), t)


def arange(shape: tuple[int, ...], dim: int) -> str:
    """The int32 tile of ``shape`` whose elements are their index along ``dim``."""
    if not pow2(shape[dim]):
        raise Unsupported(f"tl.arange needs a power-of-two length, got {shape[dim]} in {list(shape)}")
    iota = expand(f"tl.arange(0, {shape[dim]})", len(shape), [dim])
    return iota if len(shape) == 1 else f"tl.broadcast_to({iota}, {shape_text(shape)})"


def _iota(w: BodyWriter, op: Op, a: list[str]) -> str:
    t = op.result.type
    return convert(arange(t.shape, int(op.attr("dimension"))), TensorType(I32, t.shape), t)


def _element_index(w: BodyWriter, op: Op, a: list[str]) -> str:
    return f"({arange(op.result.type.shape, int(op.attr('dimension')))} + {a[0]} * {op.attr('block')})"


def _dot_acc(w: BodyWriter, op: Op, a: list[str]) -> str:
    acc, lhs, rhs = op.operands
    x = f"tl.trans({a[1]})" if op.attr("lhs_t") else a[1]
    y = f"tl.trans({a[2]})" if op.attr("rhs_t") else a[2]
    m, n = acc.type.shape
    k = lhs.type.shape[0] if op.attr("lhs_t") else lhs.type.shape[1]
    if min(m, n, k) >= 16:
        if is_narrow(lhs.type):
            w.helpers.add("_fusec_dot_operand")
            x, y = f"_fusec_dot_operand({x})", f"_fusec_dot_operand({y})"
        # (16-bit float products are exact in float32 whatever the precision asked.)
        highest = op.attr("precision") == "HIGHEST" and not is_narrow(lhs.type)
        precision = ', input_precision="ieee"' if highest else ""
        return f"tl.dot({x}, {y}, {a[0]}{precision})"
    # tl.dot needs every dimension >= 16: a small tile is a broadcast product summed over K (exact float32).
    if is_narrow(lhs.type):
        x, y = f"{x}.to(tl.float32)", f"{y}.to(tl.float32)"
    return f"({a[0]} + tl.reduce({x}[:, :, None] * {y}[None, :, :], 1, {_REDUCE['sum']}))"


def _unpack(w: BodyWriter, op: Op, a: list[str]) -> str:
    out = w.name(op.result)
    lines = unpack_lines(op, a, f"{out}_")
    for line in lines[:-1]:
        w.line(line)
    return lines[-1]


def _unpack_pair(w: BodyWriter, op: Op, a: list[str]) -> str:
    lines = unpack_pair_lines(op, a[0], f"{w.name(op.result)}_", tuple(a[1:]))
    for line in lines[:-1]:
        w.line(line)
    return lines[-1]


def _pick_lanes(w: BodyWriter, op: Op, a: list[str]) -> str:
    # [M, B] -> [M, 2B/lanes, lanes/2]: (m, 2r + h, j) is column lanes r + h lanes/2 + j; keep
    # j = lane by a sum whose other terms are -0.0 (exact: x + -0.0 is x, signed zeros and NaN too).
    (m, cols), lanes, lane = op.operands[0].type.shape, int(op.attr("lanes")), int(op.attr("lane"))
    x = f"{a[0]}.to(tl.float32)" if is_narrow(op.operands[0].type) else a[0]
    if op.attr("adjacent"):  # column lanes r + 2 j + h: swap (j, h) to (h, j) first
        x = f"tl.permute(tl.reshape({x}, ({m}, {cols // lanes}, {lanes // 2}, 2)), (0, 1, 3, 2))"
    split = f"tl.reshape({x}, ({m}, {2 * cols // lanes}, {lanes // 2}))"
    picks = []
    for t in range(int(op.attr("count", 1))):
        keep = f"(tl.arange(0, {lanes // 2}) == {lane + t})[None, None, :]"
        picked = f"tl.reduce(tl.where({keep}, {split}, -0.0), 2, {_REDUCE['sum']})"
        if op.attr("parity"):  # (m, 2r + h) with r = 2s + c to (m, c B/lanes + 2s + h)
            picked = f"tl.reshape(tl.permute(tl.reshape({picked}, ({m}, {cols // lanes // 2}, 2, 2)), " \
                     f"(0, 2, 1, 3)), ({m}, {2 * cols // lanes}))"
        picks.append(picked)
    if len(picks) == 2:  # lane, then lane + 1, along K
        picks = [f"tl.reshape(tl.permute(tl.join({picks[0]}, {picks[1]}), (0, 2, 1)), {op.result.type.shape})"]
    return f"({picks[0]}).to({tl_dtype(op.result.type)})"


EMITTERS.update({"select": _select, "convert": _convert, "broadcast": _broadcast, "reduce": _reduce,
                 "constant": _constant, "iota": _iota, "element_index": _element_index, "dot_acc": _dot_acc,
                 "unpack": _unpack, "unpack_pair": _unpack_pair, "pick_lanes": _pick_lanes,
                 "program_id": lambda w, op, a: w.program_id(int(op.attr("axis")))})
