"""The bounds proof of tile programs.

Every block index is an ``i32[]`` computed from program ids (``[0, size - 1]``), loop indices
(``[0, trips - 1]``) and constants by adds, subtracts, multiplies, divisions, remainders, mins and
maxes, so interval arithmetic bounds it. An access is in bounds when, along each dimension, its lowest block
starts at or after element 0 and its highest block ends at or before the array's end, or the
dimension is masked. A store also has to reach every block of its array (else the grid leaves part
of an output unwritten). Tile values must have power-of-two shapes (Triton's rule for every
tensor), and program ids of one axis must agree on the grid's size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fusec.errors import VerifyError
from fusec.ir.function import Function, Module, Op, Value
from fusec.ir.tile_ops import ACCESS_OPS, TILE_OPS, access_indices, loop_bounds, loop_inputs

Interval = tuple[int, int]


def overhangs(highest_block: int, block: int, size: int) -> bool:
    """Whether blocks of ``block`` elements at block indices up to ``highest_block`` can reach
    past an array dimension of ``size``: what a mask has to cover."""
    return (highest_block + 1) * block > size


def is_tile_program(func: Function) -> bool:
    return any(op.opcode in TILE_OPS for op in func.ops)


def loop_bodies(module: Module) -> set[str]:
    """Names of the functions that are bodies of some tile ``loop``."""
    return {str(op.attr("body")) for op in module.all_ops() if op.opcode == "loop"}


def _scalar_interval(op: Op, get: dict[str, Interval]) -> Interval | None:
    """The interval of a scalar integer op's result, or None when it cannot be bounded."""
    if op.result.type.shape != () or not str(op.result.type.elem).startswith(("i", "u")):
        return None
    if op.opcode == "program_id":
        return (0, int(op.attr("size")) - 1)
    if op.opcode == "constant":
        value = op.attr("value")
        return (value, value) if isinstance(value, int) and not isinstance(value, bool) else None
    args = [get.get(v.name) for v in op.operands]
    if any(a is None for a in args) or len(args) != 2:
        return None
    (a0, a1), (b0, b1) = args  # type: ignore[misc]
    if op.opcode == "add":
        return (a0 + b0, a1 + b1)
    if op.opcode == "sub":
        return (a0 - b1, a1 - b0)
    if op.opcode == "mul":
        corners = [a0 * b0, a0 * b1, a1 * b0, a1 * b1]
        return (min(corners), max(corners))
    if op.opcode == "div" and b0 > 0 and a0 >= 0:
        return (a0 // b1, a1 // b0)
    if op.opcode == "rem" and b0 == b1 > 0 and a0 >= 0:  # a batch factor: (b // stride) % size
        return (a0, a1) if a1 < b0 else (0, b0 - 1)
    if op.opcode == "max":
        return (max(a0, b0), max(a1, b1))
    if op.opcode == "min":
        return (min(a0, b0), min(a1, b1))
    return None


def loop_index_interval(op: Op, scalars: ScalarIntervals) -> Interval:
    """The interval of a loop's index: ``[0, trips - 1]``, or for a bounded loop ``[start, stop - 1]``
    at the extremes of its bounds' intervals (ValueError unless they are provably in ``[0, trips]``)."""
    trips = int(op.attr("trips"))
    bounds = loop_bounds(op)
    if bounds is None:
        return (0, max(0, trips - 1))
    start, stop = (scalars.of(v) for v in bounds)
    if start is None or stop is None:
        raise ValueError(f"its bounds {bounds[0]}, {bounds[1]} cannot be bounded")
    if start[0] < 0 or stop[1] > trips:
        raise ValueError(f"its start (in {list(start)}) or stop (in {list(stop)}) leaves 0..{trips}")
    return (start[0], max(start[0], stop[1] - 1))


@dataclass
class ScalarIntervals:
    """Intervals of a tile program's scalar values, fed op by op (the to-tile pass asks it too)."""

    intervals: dict[str, Interval] = field(default_factory=dict)

    def add(self, op: Op) -> None:
        if len(op.results) == 1:
            interval = _scalar_interval(op, self.intervals)
            if interval is not None:
                self.intervals[op.result.name] = interval

    def of(self, v: Value) -> Interval | None:
        return self.intervals.get(v.name)


def _pow2(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


class _Checker:
    def __init__(self, module: Module, program: Function) -> None:
        self.module = module
        self.program = program
        self.grid: dict[int, int] = {}

    def fail(self, message: str) -> VerifyError:
        return VerifyError(f"tile program @{self.program.name}: {message}")

    def check(self, func: Function, scalars: ScalarIntervals, refs: dict[str, Value], depth: int = 0) -> None:
        if depth > 8:
            raise self.fail("loops nest more than 8 deep (or a loop body calls itself)")
        for op in func.ops:
            for r in op.results:
                if r.type.rank and not all(_pow2(d) for d in r.type.shape):
                    raise self.fail(f"{r} has type {r.type}; tile values need power-of-two dimensions")
            if op.opcode == "program_id":
                axis, size = int(op.attr("axis")), int(op.attr("size"))
                if self.grid.setdefault(axis, size) != size:
                    raise self.fail(f"program ids of axis {axis} disagree on the grid's size "
                                    f"({self.grid[axis]} and {size})")
            elif op.opcode in ACCESS_OPS:
                self.check_access(op, scalars, refs)
            elif op.opcode == "arrive":
                self.check_arrive(op, scalars, refs)
            elif op.opcode == "loop":
                self.check_loop(op, scalars, refs, depth)
            scalars.add(op)

    def check_loop(self, op: Op, scalars: ScalarIntervals, refs: dict[str, Value], depth: int) -> None:
        try:
            body = self.module.function(str(op.attr("body")))
        except KeyError:
            raise self.fail(f"loop body @{op.attr('body')} is not in the module") from None
        carried = int(op.attr("carried"))
        want = [v.type for v in loop_inputs(op)]
        if [p.type for p in body.params[1:]] != want or not body.params or \
                body.params[0].type.shape != () or str(body.params[0].type.elem) != "i32":
            raise self.fail(f"loop body @{body.name} must take (i32[] index, "
                            f"{', '.join(map(str, want))}), it takes ({', '.join(str(p.type) for p in body.params)})")
        if [r.type for r in body.returns] != want[:carried]:
            raise self.fail(f"loop body @{body.name} must return the {carried} carried value(s)")
        try:
            index = loop_index_interval(op, scalars)
        except ValueError as e:
            raise self.fail(f"loop over @{body.name}: {e}") from None
        inner = ScalarIntervals({body.params[0].name: index})
        inner_refs: dict[str, Value] = {}
        for p, v in zip(body.params[1:], loop_inputs(op)):
            if scalars.of(v) is not None:
                inner.intervals[p.name] = scalars.of(v)  # type: ignore[assignment]
            if v.name in refs:
                inner_refs[p.name] = refs[v.name]
        self.check(body, inner, inner_refs, depth + 1)

    def check_arrive(self, op: Op, scalars: ScalarIntervals, refs: dict[str, Value]) -> None:
        ref = refs.get(op.operands[0].name)
        if ref is None:
            raise self.fail(f"arrive counts in {op.operands[0]}, which is not one of the kernel's arrays")
        interval = scalars.of(op.operands[1])
        size = op.operands[0].type.shape[0]
        if interval is None or interval[0] < 0 or interval[1] >= size:
            raise self.fail(f"arrive at %{ref.name}[{op.operands[1]}]: the index ({interval}) is not proven "
                            f"within its {size} counters")

    def check_access(self, op: Op, scalars: ScalarIntervals, refs: dict[str, Value]) -> None:
        ref = refs.get(op.operands[0].name)
        if ref is None:
            raise self.fail(f"{op.opcode} addresses {op.operands[0]}, which is not one of the kernel's arrays")
        array = op.operands[0].type
        block, masked = tuple(op.attr("block")), set(op.attr("masked", ()))
        what = f"{op.opcode} of %{ref.name}"
        for d, index in enumerate(access_indices(op)):
            interval = scalars.of(index)
            if interval is None:
                raise self.fail(f"{what}: the block index {index} of dimension {d} cannot be bounded")
            lo, hi = interval
            size, b = array.shape[d], block[d]
            if lo < 0:
                raise self.fail(f"{what}: dimension {d} block index can be {lo}, before the array's start")
            if overhangs(hi, b, size) and d not in masked:
                raise self.fail(f"{what} reads or writes past the end of dimension {d}: blocks of {b} at block "
                                f"index up to {hi} reach element {(hi + 1) * b}, but %{ref.name} has {size} "
                                f"there ({array}); mask dimension {d}")
            if op.opcode != "load" and (lo != 0 or (hi + 1) * b < size):
                raise self.fail(f"the grid does not cover %{ref.name}: along dimension {d} its blocks of {b} "
                                f"reach elements {lo * b}..{(hi + 1) * b - 1} of {size}")


def verify_tile_program(module: Module, program: Function) -> dict[int, int]:
    """Proves ``program``'s accesses in bounds and its stores covering their arrays; returns the
    grid size of each axis its program ids read. Raises :class:`VerifyError` naming the operand
    and dimension."""
    if program.returns:
        raise VerifyError(f"tile program @{program.name}: returns values; a kernel writes its outputs with store")
    checker = _Checker(module, program)
    checker.check(program, ScalarIntervals(), {p.name: p for p in program.params})
    return dict(checker.grid)
