"""Rules for sharding annotations: ``with_sharding_constraint`` and nested ``jit`` calls with
``in_shardings``/``out_shardings`` become ``sharding_constraint`` ops around the (compiled) body,
which the runtime applies again with ``jax.lax.with_sharding_constraint``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fusec.frontend.rules import Lowerer, NoRule, register, unpartitioned
from fusec.ir import Value


def _specified(sharding: Any) -> bool:
    return type(sharding).__name__ != "UnspecifiedValue" and not unpartitioned(sharding)


@register("sharding_constraint")
def _sharding_constraint(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    p = eqn.params
    if p.get("layout") is not None or p.get("unconstrained_dims"):
        raise NoRule("sharding constraints with layouts or unconstrained dimensions are not supported")
    sharding = p["sharding"]
    return [ctx.constrain(ins[0], sharding) if _specified(sharding) else ins[0]]


@register("pjit", "jit")
def _jit(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    p = eqn.params
    if any(x is not None for x in (*p.get("in_layouts", ()), *p.get("out_layouts", ()))):
        raise NoRule("explicit layouts are not supported")
    in_shardings = p.get("in_shardings", ()) or (None,) * len(ins)
    ins = [ctx.constrain(v, s) if _specified(s) else v for v, s in zip(ins, in_shardings)]
    outs = ctx.call_or_inline(p["jaxpr"], ins, str(p.get("name", "jit")))
    out_shardings = p.get("out_shardings", ()) or (None,) * len(outs)
    return [ctx.constrain(v, s) if _specified(s) else v for v, s in zip(outs, out_shardings)]
