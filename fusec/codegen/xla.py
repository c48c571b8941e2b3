"""The reference backend: an IR module back into plain ``lax`` calls, one rule per opcode.

It is the oracle every other backend is checked against, and what runs where no GPU is.
Opaque ops re-bind their original JAX equation, so anything fusec does not understand still runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax import lax

from fusec.errors import FusecError
from fusec.ir import DType, Function, Module, Op

Emit = Callable[[Op, list[Any], "Evaluator"], Sequence[Any]]
EMITTERS: dict[str, Emit] = {}


def emits(*opcodes: str) -> Callable[[Emit], Emit]:
    def wrap(fn: Emit) -> Emit:
        for opcode in opcodes:
            EMITTERS[opcode] = fn
        return fn
    return wrap


def numpy_dtype(elem: Any) -> np.dtype:
    if not isinstance(elem, DType):
        raise FusecError(f"the XLA backend cannot materialise element type {elem}")
    return np.dtype(elem.numpy_name)


def _unary(fn: Callable[[Any], Any]) -> Emit:
    return lambda op, args, ev: [fn(args[0])]


def _binary(fn: Callable[[Any, Any], Any]) -> Emit:
    return lambda op, args, ev: [fn(args[0], args[1])]


LAX_UNARY = {
    "neg": lax.neg, "exp": lax.exp, "exp2": lax.exp2, "log": lax.log, "log1p": lax.log1p, "expm1": lax.expm1,
    "tanh": lax.tanh, "logistic": lax.logistic, "sin": lax.sin, "cos": lax.cos, "tan": lax.tan,
    "asin": lax.asin, "acos": lax.acos, "atan": lax.atan, "sinh": lax.sinh, "cosh": lax.cosh,
    "asinh": lax.asinh, "acosh": lax.acosh, "atanh": lax.atanh, "sqrt": lax.sqrt, "rsqrt": lax.rsqrt,
    "cbrt": lax.cbrt, "erf": lax.erf, "erfc": lax.erfc, "erf_inv": lax.erf_inv, "lgamma": lax.lgamma,
    "digamma": lax.digamma, "floor": lax.floor, "ceil": lax.ceil, "abs": lax.abs, "sign": lax.sign,
    "not": lax.bitwise_not, "square": lax.square, "stop_gradient": lax.stop_gradient,
    "population_count": lax.population_count, "clz": lax.clz, "is_finite": lax.is_finite,
}
LAX_BINARY = {
    "add": lax.add, "sub": lax.sub, "mul": lax.mul, "div": lax.div, "rem": lax.rem, "pow": lax.pow,
    "max": lax.max, "min": lax.min, "atan2": lax.atan2, "and": lax.bitwise_and, "or": lax.bitwise_or,
    "xor": lax.bitwise_xor, "shift_left": lax.shift_left, "shift_right_logical": lax.shift_right_logical,
    "shift_right_arithmetic": lax.shift_right_arithmetic, "nextafter": lax.nextafter,
    "eq": lax.eq, "ne": lax.ne, "lt": lax.lt, "le": lax.le, "gt": lax.gt, "ge": lax.ge,
}
_REDUCE = {"sum": lax.reduce_sum, "prod": lax.reduce_prod, "max": lax.reduce_max, "min": lax.reduce_min,
           "and": lax.reduce_and, "or": lax.reduce_or, "xor": lax.reduce_xor}

for _name, _fn in LAX_UNARY.items():
    EMITTERS[_name] = _unary(_fn)
for _name, _fn in LAX_BINARY.items():
    EMITTERS[_name] = _binary(_fn)


@emits("round")
def _round(op: Op, args: list[Any], ev: Evaluator) -> Sequence[Any]:
    return [lax.round(args[0], lax.RoundingMethod(op.attr("method", 0)))]


@emits("integer_pow")
def _integer_pow(op: Op, args: list[Any], ev: Evaluator) -> Sequence[Any]:
    return [lax.integer_pow(args[0], op.attr("y"))]


@emits("select")
def _select(op: Op, args: list[Any], ev: Evaluator) -> Sequence[Any]:
    return [lax.select_n(*args)]


@emits("clamp")
def _clamp(op: Op, args: list[Any], ev: Evaluator) -> Sequence[Any]:
    return [lax.clamp(*args)]


@emits("convert")
def _convert(op: Op, args: list[Any], ev: Evaluator) -> Sequence[Any]:
    return [lax.convert_element_type(args[0], numpy_dtype(op.result.type.elem))]


@emits("broadcast")
def _broadcast(op: Op, args: list[Any], ev: Evaluator) -> Sequence[Any]:
    return [lax.broadcast_in_dim(args[0], op.attr("shape"), op.attr("dims"))]


@emits("reshape")
def _reshape(op: Op, args: list[Any], ev: Evaluator) -> Sequence[Any]:
    return [lax.reshape(args[0], op.attr("shape"))]


@emits("transpose")
def _transpose(op: Op, args: list[Any], ev: Evaluator) -> Sequence[Any]:
    return [lax.transpose(args[0], op.attr("perm"))]


@emits("slice")
def _slice(op: Op, args: list[Any], ev: Evaluator) -> Sequence[Any]:
    return [lax.slice(args[0], op.attr("start"), op.attr("limit"), op.attr("strides"))]


@emits("concatenate")
def _concatenate(op: Op, args: list[Any], ev: Evaluator) -> Sequence[Any]:
    return [lax.concatenate(args, op.attr("axis"))]


@emits("reduce")
def _reduce(op: Op, args: list[Any], ev: Evaluator) -> Sequence[Any]:
    return [_REDUCE[op.attr("kind")](args[0], op.attr("axes"))]


@emits("argmax", "argmin")
def _arg_reduce(op: Op, args: list[Any], ev: Evaluator) -> Sequence[Any]:
    fn = lax.argmax if op.opcode == "argmax" else lax.argmin
    return [fn(args[0], op.attr("axes")[0], numpy_dtype(op.result.type.elem))]


@emits("dot")
def _dot(op: Op, args: list[Any], ev: Evaluator) -> Sequence[Any]:
    lhs, rhs = args
    rank = len(op.operands[0].type.shape)
    batch = tuple(range(rank - 2))
    lhs_k = rank - 2 if op.attr("lhs_t") else rank - 1
    rhs_k = rank - 1 if op.attr("rhs_t") else rank - 2
    out = lax.dot_general(lhs, rhs, (((lhs_k,), (rhs_k,)), (batch, batch)), precision=_dot_precision(op),
                          preferred_element_type=numpy_dtype(op.result.type.elem))
    # dot_general orders its output (batch, lhs free, rhs free), which is [B..., M, N] either way.
    return [out]


def _dot_precision(op: Op) -> Any:
    """JAX's precision parameter back from the dot's attributes (see the frontend's dot rule)."""
    if op.attr("algorithm") is not None:
        return lax.DotAlgorithmPreset[op.attr("algorithm")]
    if op.attr("precision_pair") is not None:
        return tuple(lax.Precision[p] for p in op.attr("precision_pair"))
    return None if op.attr("precision") is None else lax.Precision[op.attr("precision")]


@emits("dequantize")
def _dequantize(op: Op, args: list[Any], ev: Evaluator) -> Sequence[Any]:
    from fusec.ir.types import LowBitType, parse_elem_type
    from fusec.lowprec.formats import format_of, group_size
    from fusec.lowprec.qarray import dequantize_impl

    t = parse_elem_type(str(op.attr("format")))
    assert isinstance(t, LowBitType)
    fmt = format_of(t, op.attr("lut"))
    leaves = args[0] if len(args) == 1 else args  # one low-bit value is its tuple of leaves
    return [dequantize_impl(*leaves, family=fmt.family, bits=fmt.bits, layout=fmt.layout, lut=fmt.lut,
                            group=group_size(t, op.attr("shape")[0]), shape=tuple(op.attr("shape")),
                            dtype=numpy_dtype(op.result.type.elem).name, has_zeros=t.zero_point,
                            packing=t.packing)]


@emits("input_transform")
def _input_transform(op: Op, args: list[Any], ev: Evaluator) -> Sequence[Any]:
    from fusec.lowprec.transform import apply_transform

    return [apply_transform(args[0], args[1] if len(args) > 1 else None, block=int(op.attr("block")),
                            axis=int(op.attr("axis")), side=str(op.attr("side")))]


@emits("iota")
def _iota(op: Op, args: list[Any], ev: Evaluator) -> Sequence[Any]:
    out = op.result.type
    return [lax.broadcasted_iota(numpy_dtype(out.elem), out.shape, op.attr("dimension"))]


@emits("constant")
def _constant(op: Op, args: list[Any], ev: Evaluator) -> Sequence[Any]:
    out = op.result.type
    dt = numpy_dtype(out.elem)
    value = op.attr("value")
    if isinstance(value, tuple):
        return [np.asarray(value, dtype=np.float64 if dt.kind == "V" else None).astype(dt).reshape(out.shape)]
    # A splat becomes a broadcast of one scalar, never a materialised array.
    return [lax.full(out.shape, np.asarray(value).astype(dt), dt)]


@emits("call", "kernel")
def _call(op: Op, args: list[Any], ev: Evaluator) -> Sequence[Any]:
    return ev.run(ev.module.function(str(op.attr("callee"))), args)


@emits("sharding_constraint")
def _sharding_constraint(op: Op, args: list[Any], ev: Evaluator) -> Sequence[Any]:
    sharding = ev.module.externals.get(str(op.attr("ref")))
    if sharding is None:
        raise FusecError(f"sharding_constraint {op.attr('ref')!r} has no sharding attached; "
                         "IR read back from text cannot run it")
    return [jax.lax.with_sharding_constraint(args[0], sharding)]


@emits("opaque")
def _opaque(op: Op, args: list[Any], ev: Evaluator) -> Sequence[Any]:
    ref = str(op.attr("ref"))
    eqn = ev.module.externals.get(ref)
    if eqn is None:
        raise FusecError(f"opaque op {ref!r} ({op.attr('primitive')}) has no JAX equation attached; "
                         "IR read back from text cannot run opaque ops")
    params = dict(eqn.params)
    bodies = list(op.attr("bodies", ()))
    if bodies:
        params = _with_compiled_bodies(eqn, params, bodies, ev)
    return bind_equation(eqn, args, params)


def _with_compiled_bodies(eqn: Any, params: dict[str, Any], bodies: list[str], ev: Evaluator) -> dict[str, Any]:
    """The equation's params with each body jaxpr replaced by a trace of fusec's function for it.
    A body whose retraced types differ (weak types, say) keeps JAX's own body."""
    from jax.extend.core import ClosedJaxpr

    from fusec.frontend.jaxpr_to_ir import CONTROL_FLOW_BODIES

    names = iter(bodies)

    def compiled(closed: Any) -> Any:
        func = ev.module.function(next(names))
        avals = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type) for a in closed.in_avals]
        def run(*a: Any) -> tuple[Any, ...]:
            outs = ev.run(func, a)
            # Loop carries must keep their exact types, weak typing included.
            return tuple(ev.make_weak(o) if getattr(want, "weak_type", False) else o
                         for o, want in zip(outs, closed.out_avals))

        new = jax.make_jaxpr(run)(*avals)
        same = list(new.out_avals) == list(closed.out_avals) and list(new.in_avals) == list(closed.in_avals)
        return ClosedJaxpr(new.jaxpr, new.consts) if same else closed

    for key in CONTROL_FLOW_BODIES[eqn.primitive.name]:
        value = params[key]
        params[key] = tuple(compiled(c) for c in value) if isinstance(value, tuple) else compiled(value)
    return params


def bind_equation(eqn: Any, args: Sequence[Any], params: dict[str, Any] | None = None) -> list[Any]:
    """Runs one jaxpr equation on ``args``, as ``jax.core.eval_jaxpr`` would."""
    bind_params = eqn.primitive.get_bind_params(eqn.params if params is None else params)
    subfuns: Sequence[Any] = ()
    if isinstance(bind_params, tuple):  # older JAX returns (subfuns, params)
        subfuns, bind_params = bind_params
    with eqn.ctx.manager:
        outs = eqn.primitive.bind(*subfuns, *args, **bind_params)
    return list(outs) if eqn.primitive.multiple_results else [outs]


class Evaluator:
    """Evaluates IR functions on JAX values (tracers under ``jax.jit``)."""

    def __init__(self, module: Module, overrides: dict[str, Emit] | None = None,
                 make_weak: Callable[[Any], Any] | None = None) -> None:
        self.module = module
        self.emitters = EMITTERS | (overrides or {})
        # Marks a value weakly typed; the runtime provides it (it needs JAX internals).
        self.make_weak = make_weak or (lambda x: x)

    def run(self, func: Function, args: Sequence[Any]) -> list[Any]:
        if len(args) != len(func.params):
            raise FusecError(f"@{func.name} takes {len(func.params)} arguments, got {len(args)}")
        env: dict[str, Any] = {p.name: a for p, a in zip(func.params, args)}
        for op in func.ops:
            emit = self.emitters.get(op.opcode)
            if emit is None:
                raise FusecError(f"the XLA backend has no rule for op {op.opcode!r}")
            outs = emit(op, [env[v.name] for v in op.operands], self)
            env.update({r.name: o for r, o in zip(op.results, outs)})
        return [env[v.name] for v in func.returns]


def module_to_callable(module: Module, make_weak: Callable[[Any], Any] | None = None) -> Callable[..., list[Any]]:
    """A function of the entry's parameters (flat) returning its results as a list."""
    evaluator = Evaluator(module, make_weak=make_weak)
    return lambda *args: evaluator.run(module.entry, args)
