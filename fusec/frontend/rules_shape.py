"""Frontend rules for shape primitives newer JAX has (``tile``, ``stack``, ``unstack``), for
``dynamic_slice`` at literal offsets and for ``pad`` (edge and interior), in terms of the IR's
broadcast, reshape, slice and concatenate (registered into :data:`fusec.frontend.rules.RULES` on import)."""

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


@register("pad")
def _pad(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    """Interior padding by interleaving (each element followed by ``interior`` fills along a new
    axis, merged, the last fills cut), then edge padding as a slice (negative padding) and a
    concatenate with the padding value per axis, in XLA's order."""
    x, fill = ins
    config = tuple(eqn.params["padding_config"])
    for axis, (_, _, interior) in enumerate(config):
        n = x.type.shape[axis]
        if interior == 0 or n <= 1:
            continue
        shape = x.type.shape
        column = ctx.reshape(x, shape[:axis + 1] + (1,) + shape[axis + 1:])
        fills = ctx.broadcast_to(fill, shape[:axis + 1] + (interior,) + shape[axis + 1:])
        spread = ctx.builder.op("concatenate", [column, fills], axis=axis + 1)
        x = ctx.reshape(spread, shape[:axis] + (n * (1 + interior),) + shape[axis + 1:])
        limit = tuple(n * (1 + interior) - interior if d == axis else m for d, m in enumerate(x.type.shape))
        x = ctx.builder.op("slice", [x], start=(0,) * x.type.rank, limit=limit, strides=(1,) * x.type.rank)
    if any(lo < 0 or hi < 0 for lo, hi, _ in config):
        start = tuple(max(-lo, 0) for lo, _, _ in config)
        limit = tuple(n - max(-hi, 0) for n, (_, hi, _) in zip(x.type.shape, config))
        x = ctx.builder.op("slice", [x], start=start, limit=limit, strides=(1,) * x.type.rank)
    for axis, (lo, hi, _) in enumerate(config):
        pieces = []
        for amount in (lo, hi):
            shape = tuple(amount if d == axis else n for d, n in enumerate(x.type.shape))
            pieces.append(ctx.broadcast_to(fill, shape) if amount > 0 else None)
        parts = [v for v in (pieces[0], x, pieces[1]) if v is not None]
        if len(parts) > 1:
            x = ctx.builder.op("concatenate", parts, axis=axis)
    return [x]
