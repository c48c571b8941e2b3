"""Python source for the ops of a tile program, one emitter per opcode.

Elementwise ops use the reference backend's opcode-to-``lax`` table (one table for both backends);
bfloat16/float16 arithmetic is done in float32 and rounded back, as XLA does on CPU and as Triton
needs for many ops. Loads, stores and loops are written by the kernel writer (pallas.py), which
knows the refs.
"""

from __future__ import annotations

from collections.abc import Callable

from fusec.codegen.pallas_special import SPECIAL_FUNCTIONS
from fusec.codegen.pallas_text import jnp_dtype, literal
from fusec.codegen.pallas_unpack import unpack_pair_source, unpack_source
from fusec.codegen.source_writer import SourceWriter
from fusec.codegen.xla import LAX_BINARY, LAX_UNARY
from fusec.errors import FusecError
from fusec.ir import DType, Op

# Never widened: exact in any float width (no rounding), or, for nextafter, defined by the format
# itself (float32's neighbour rounds back to the input); its helper works on 16-bit floats directly.
_EXACT = frozenset({"neg", "abs", "sign", "max", "min", "eq", "ne", "lt", "le", "gt", "ge", "is_finite", "floor",
                    "ceil", "nextafter"})
_REDUCE = {"sum": "jnp.sum", "prod": "jnp.prod", "max": "jnp.max", "min": "jnp.min"}
# Pallas's Triton lowering has these under other names, or not at all (written out in pallas_special).
_NOT_LAX = frozenset({"stop_gradient", "shift_left", "shift_right_logical", "shift_right_arithmetic"})


class BodyWriter(SourceWriter):
    """Identifiers of a tile program's values, and the lines written so far."""

    def emit(self, op: Op) -> None:
        emitter = EMITTERS.get(op.opcode)
        if emitter is None:
            raise FusecError(f"the Pallas backend cannot put op {op.opcode!r} in a kernel")
        expr = emitter(self, op, [self.name(v) for v in op.operands])
        self.line(f"{self.name(op.result)} = {expr}  # {op.result.name}: {op.result.type}")


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


_CALLS = {op: f"lax.{fn.__name__}" for op, fn in {**LAX_UNARY, **LAX_BINARY}.items() if op not in _NOT_LAX}
for _op, _fn in {**_CALLS, **SPECIAL_FUNCTIONS}.items():
    EMITTERS[_op] = (lambda fn: lambda w, op, a: _widened(op, fn, a))(_fn)

EMITTERS["stop_gradient"] = lambda w, op, a: a[0]
EMITTERS["integer_pow"] = lambda w, op, a: _widened(op, f"(lambda x: lax.integer_pow(x, {op.attr('y')}))", a)
def _select(w: BodyWriter, op: Op, a: list[str]) -> str:
    elem = op.result.type.elem
    if isinstance(elem, DType) and elem.name in ("bf16", "f16"):
        # Selected as bit patterns: a 16-bit float select that the compiler widens to float32 (XLA's
        # CPU backend, under interpret mode) flushes subnormals to zero; a select must not round.
        bits = lambda x: f"lax.bitcast_convert_type({x}, jnp.uint16)"  # noqa: E731
        return f"lax.bitcast_convert_type(jnp.where({a[0]}, {bits(a[2])}, {bits(a[1])}), {jnp_dtype(op.result)})"
    return f"jnp.where({a[0]}, {a[2]}, {a[1]})"


EMITTERS["select"] = _select
EMITTERS["clamp"] = lambda w, op, a: f"lax.clamp({a[0]}, {a[1]}, {a[2]})"
EMITTERS["convert"] = lambda w, op, a: f"{a[0]}.astype({jnp_dtype(op.result)})"
EMITTERS["program_id"] = lambda w, op, a: f"pl.program_id({op.attr('axis')})"


def _shift(op: Op, a: list[str]) -> str:
    # XLA defines shifts by >= the bit width; a GPU shift by the full width is poison, so clamp.
    bits = op.operands[0].type.elem.bits  # type: ignore[union-attr]
    amount = f"jnp.minimum({a[1]}.astype(jnp.uint32), {bits - 1}).astype({a[1]}.dtype)"
    shifted = f"lax.{op.opcode}({a[0]}, {amount})"
    if op.opcode == "shift_right_arithmetic":
        return shifted
    return f"jnp.where({a[1]}.astype(jnp.uint32) < {bits}, {shifted}, jnp.zeros_like({a[0]}))"


for _op in ("shift_left", "shift_right_logical", "shift_right_arithmetic"):
    EMITTERS[_op] = lambda w, op, a: _shift(op, a)


def _broadcast(w: BodyWriter, op: Op, a: list[str]) -> str:
    return f"lax.broadcast_in_dim({a[0]}, {tuple(op.attr('shape'))}, {tuple(op.attr('dims'))})"


def _over(fn: str, x: str, axes: list[int]) -> str:
    """``fn`` reduced over each of ``axes`` in turn, the highest first (Triton reduces one axis
    at a time)."""
    for axis in sorted(axes, reverse=True):
        x = f"{fn}({x}, axis={axis})"
    return x


def _reduce(w: BodyWriter, op: Op, a: list[str]) -> str:
    kind = str(op.attr("kind"))
    axes = list(op.attr("axes"))
    x = a[0]
    elem = op.operands[0].type.elem
    wide = isinstance(elem, DType) and elem.name in ("bf16", "f16")
    if wide:
        x = f"{x}.astype(jnp.float32)"
    out = _over(_REDUCE[kind], x, axes)
    if kind in ("max", "min") and isinstance(elem, DType) and elem.is_float:
        # XLA's max/min propagate NaN; Triton's row reductions and XLA:CPU's vectorised ones (rows
        # of 32, say) may drop it, so a row holding a NaN is made NaN explicitly.
        # (A count, not jnp.any: Pallas-Triton has no reduce_or.)
        out = f"jnp.where({_over('jnp.sum', f'jnp.where({x} != {x}, 1, 0)', axes)} > 0, jnp.nan, {out})"
    return f"{out}.astype({jnp_dtype(op.result)})" if wide else out


def _constant(w: BodyWriter, op: Op, a: list[str]) -> str:
    shape = op.result.type.shape
    if shape == () and op.result.type.elem == DType("i32"):
        w.consts[op.result.name] = int(op.attr("value"))
        return f"jnp.int32({literal(op.attr('value'))})"
    return f"jnp.full({shape}, {literal(op.attr('value'))}, {jnp_dtype(op.result)})"


def _iota(w: BodyWriter, op: Op, a: list[str]) -> str:
    return f"lax.broadcasted_iota({jnp_dtype(op.result)}, {op.result.type.shape}, {op.attr('dimension')})"


def _element_index(w: BodyWriter, op: Op, a: list[str]) -> str:
    iota = f"lax.broadcasted_iota(jnp.int32, {op.result.type.shape}, {op.attr('dimension')})"
    return f"{iota} + {a[0]} * {op.attr('block')}"


def _dot_acc(w: BodyWriter, op: Op, a: list[str]) -> str:
    a_k = 0 if op.attr("lhs_t") else 1
    b_k = 1 if op.attr("rhs_t") else 0
    precision = op.attr("precision")
    prec = f", precision=lax.Precision.{precision}" if precision else ""
    acc = jnp_dtype(op.result)
    return (f"{a[0]} + lax.dot_general({a[1]}, {a[2]}, ((({a_k},), ({b_k},)), ((), ())), "
            f"preferred_element_type={acc}{prec})")


def _unpack(w: BodyWriter, op: Op, a: list[str]) -> str:
    fn = f"_unpack_{w.name(op.result)}"
    w.line(f"def {fn}({', '.join(f'x{i}' for i in range(len(a)))}):")
    for line in unpack_source(op, [f"x{i}" for i in range(len(a))]):
        w.line("    " + line)
    return f"{fn}({', '.join(a)})"


def _unpack_pair(w: BodyWriter, op: Op, a: list[str]) -> str:
    fn = f"_unpack_{w.name(op.result)}"
    planes = tuple(f"plane{i}" for i in range(1, len(a)))
    w.line(f"def {fn}({', '.join(('words', *planes))}):")
    for line in unpack_pair_source(op, "words", planes):
        w.line("    " + line)
    return f"{fn}({', '.join(a)})"


def _pick_lanes(w: BodyWriter, op: Op, a: list[str]) -> str:
    # [M, B] -> [M, B/lanes, 2, lanes/2]: (r, h, j) is column lanes r + j + h lanes/2; keep j = lane.
    (m, cols), lanes, lane = op.operands[0].type.shape, int(op.attr("lanes")), int(op.attr("lane"))
    if op.attr("adjacent"):  # (r, j, h) is column lanes r + 2 j + h
        split = f"jnp.split({a[0]}.reshape({m}, {cols // lanes}, {lanes // 2}, 2), {lanes // 2}, axis=2)"
    else:
        split = f"jnp.split({a[0]}.reshape({m}, {cols // lanes}, 2, {lanes // 2}), {lanes // 2}, axis=-1)"
    one = (m, 2 * cols // lanes)
    if op.attr("parity"):  # (m, 2r + h) with r = 2s + c to (m, c B/lanes + 2s + h)
        picks = [f"{split}[{lane + t}].reshape({m}, {cols // lanes // 2}, 2, 2).transpose(0, 2, 1, 3).reshape({one})"
                 for t in range(int(op.attr("count", 1)))]
    else:
        picks = [f"{split}[{lane + t}].reshape({one})" for t in range(int(op.attr("count", 1)))]
    if len(picks) == 1:
        return picks[0]
    return f"jnp.stack([{', '.join(picks)}], axis=-1).transpose(0, 2, 1).reshape({op.result.type.shape})"


EMITTERS.update({"broadcast": _broadcast, "reduce": _reduce, "constant": _constant, "iota": _iota,
                 "element_index": _element_index, "dot_acc": _dot_acc, "unpack": _unpack,
                 "unpack_pair": _unpack_pair, "pick_lanes": _pick_lanes})
