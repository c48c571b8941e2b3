"""Frontend rules for elementwise primitives newer JAX releases added, written in the IR's ops the
way JAX's own lowering writes them, so results match ``jax.jit``'s (registered into
:data:`fusec.frontend.rules.RULES` on import):

- ``log2`` (JAX 0.11): ``log(x) * (1 / ln 2)``;
- ``one_minus_square`` (JAX 0.11; the JVP of ``tanh``, ``asin``, ``acos``, ``atanh``): ``(1 + x) * (1 - x)``;
- ``polynomial`` (JAX 0.12; ``jnp.polyval``, ``jnp.sinc``): Horner's rule, unrolled; above the
  unroll threshold JAX starts its loop from zero, so ``0 * x`` is kept for NaN and infinity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fusec.frontend.rules import Lowerer, NoRule, register, require_defaults
from fusec.ir import Value

_ONE_OVER_LN2 = 1.4426950408889634  # what JAX's log2 lowering multiplies by


def _splat(ctx: Lowerer, value: float, like: Value) -> Value:
    return ctx.builder.op("constant", (), value=value, dtype=str(like.type.elem), shape=like.type.shape)


def _real_or_int(x: Value, name: str) -> None:
    if str(x.type.elem).startswith("c"):
        raise NoRule(f"{name} of complex numbers")


@register("log2")
def _log2(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    require_defaults(eqn, accuracy=None)
    (x,) = ins
    _real_or_int(x, "log2")
    return [ctx.builder.op("mul", [ctx.builder.op("log", [x]), _splat(ctx, _ONE_OVER_LN2, x)])]


@register("one_minus_square")
def _one_minus_square(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    (x,) = ins
    _real_or_int(x, "one_minus_square")
    one = _splat(ctx, 1, x)
    return [ctx.builder.op("mul", [ctx.builder.op("add", [one, x]), ctx.builder.op("sub", [one, x])])]


@register("polynomial")
def _polynomial(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    x, *coeffs = ins
    unroll = eqn.params.get("unroll")
    threshold = 8 if unroll is None else int(unroll)
    if set(eqn.params) - {"unroll"}:
        raise NoRule(f"polynomial parameters {sorted(set(eqn.params) - {'unroll'})}")
    _real_or_int(x, "polynomial")
    shape = tuple(eqn.outvars[0].aval.shape)
    x = ctx.broadcast_to(x, shape)
    coeffs = [ctx.broadcast_to(c, shape) for c in coeffs]
    if len(coeffs) <= threshold:
        acc, rest = coeffs[-1], coeffs[:-1]
    else:
        acc, rest = _splat(ctx, 0, x), coeffs
    for c in reversed(rest):
        acc = ctx.builder.op("add", [ctx.builder.op("mul", [acc, x]), c])
    return [acc]
