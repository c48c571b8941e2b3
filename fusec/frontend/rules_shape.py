"""Frontend rules for shape primitives newer JAX has (``tile``, ``stack``, ``unstack``) and for
``dynamic_slice`` at literal offsets, in terms of the IR's broadcast, reshape, slice and
concatenate (registered into :data:`fusec.frontend.rules.RULES` on import)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fusec.frontend.rules import Lowerer, NoRule, literal_value, register
from fusec.ir import Value


@register("tile")
def _tile(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    """tile(x, reps) = x broadcast along a new axis before each one, then merged into it."""
    (x,) = ins
    reps = tuple(int(r) for r in eqn.params["reps"])
    shape = x.type.shape
    if len(reps) > len(shape):  # leading reps add axes of size 1 first
        shape = (1,) * (len(reps) - len(shape)) + shape
        x = ctx.reshape(x, shape)
    reps = (1,) * (len(shape) - len(reps)) + reps
    wide = tuple(n for pair in zip(reps, shape) for n in pair)
    spread = ctx.builder.op("broadcast", [x], shape=wide, dims=tuple(range(1, 2 * len(shape), 2)))
    return [ctx.reshape(spread, tuple(eqn.outvars[0].aval.shape))]


@register("stack")
def _stack(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    axis = int(eqn.params["axis"])
    parts = [ctx.reshape(v, v.type.shape[:axis] + (1,) + v.type.shape[axis:]) for v in ins]
    return [ctx.builder.op("concatenate", parts, axis=axis) if len(parts) > 1 else parts[0]]


@register("unstack")
def _unstack(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    (x,) = ins
    axis, outs = int(eqn.params["axis"]), []
    for i in range(x.type.shape[axis]):
        start = tuple(i if d == axis else 0 for d in range(x.type.rank))
        limit = tuple(i + 1 if d == axis else n for d, n in enumerate(x.type.shape))
        piece = ctx.builder.op("slice", [x], start=start, limit=limit, strides=(1,) * x.type.rank)
        outs.append(ctx.reshape(piece, x.type.shape[:axis] + x.type.shape[axis + 1:]))
    return outs


@register("dynamic_slice")
def _dynamic_slice(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    """A dynamic slice at literal offsets is a slice (offsets clamped into range, as XLA does)."""
    x = ins[0]
    offsets = [literal_value(v.val) if hasattr(v, "val") else None for v in eqn.invars[1:]]
    if any(o is None or isinstance(o, (bool, float)) for o in offsets):
        raise NoRule("offsets computed at run time")
    sizes = tuple(int(n) for n in eqn.params["slice_sizes"])
    start = tuple(min(max(int(o), 0), n - s) for o, n, s in zip(offsets, x.type.shape, sizes))  # type: ignore[arg-type]
    return [ctx.builder.op("slice", [x], start=start, limit=tuple(a + s for a, s in zip(start, sizes)),
                           strides=(1,) * x.type.rank)]
