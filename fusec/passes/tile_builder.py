"""The pieces the ``to-tile`` pass builds tile programs with: how a kernel addresses an array
(:class:`ArrayMapping`, Pallas's BlockMapping in spirit) and a builder that emits a tile function's
ops with fresh names, tracking its scalars' intervals so masks are decided as the verifier proves."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fusec.errors import FusecError
from fusec.ir import Function, KernelTiling, Op, ScalarIntervals, TensorType, Value, overhangs
from fusec.ir.types import BOOL, I32
from fusec.passes.views import View, block_spec_through_view

SCALAR = TensorType(I32, ())
# Block index of one array dimension: constant + sum(coefficient * program id of grid axis).
IndexExpr = tuple[int, tuple[tuple[int, int], ...]]


@dataclass(frozen=True)
class ArrayMapping:
    """How a kernel addresses one array: per dimension, the block (None: squeezed, one element per
    program) and the block index as an affine function of program ids (Pallas's BlockMapping)."""

    blocks: tuple[int | None, ...]
    index: tuple[IndexExpr, ...]
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        self.check_invariants()

    def check_invariants(self) -> None:
        if not len(self.blocks) == len(self.index) == len(self.shape):
            raise ValueError(f"blocks {self.blocks}, index {self.index} and shape {self.shape} differ in rank")
        if any(b is not None and b < 1 for b in self.blocks):
            raise ValueError(f"blocks {self.blocks} must be positive")

    @staticmethod
    def of(dims: list[tuple[int | None, int | None]], shape: tuple[int, ...], view: View | None,
           output: bool) -> ArrayMapping:
        if view is None:
            return ArrayMapping(tuple(b for b, _ in dims), tuple((0, ((1, a),)) if a is not None else (0, ())
                                                                for _, a in dims), tuple(shape))
        through = block_spec_through_view(view, shape, dims, output)
        if through is None:
            raise FusecError(f"a folded view {view} cannot be addressed blockwise")
        blocks, index = through
        return ArrayMapping(tuple(blocks), tuple((c, tuple(terms)) for c, terms in index), tuple(view.base_shape))


def reduction_identity(kind: str, elem: Any) -> Any:
    """The reduction identity as an IR constant of ``elem``."""
    if kind == "sum":
        return 0.0 if elem.is_float else 0
    if kind == "prod":
        return 1.0 if elem.is_float else 1
    high = kind == "min"
    if elem.is_float:
        return float("inf") if high else float("-inf")
    if elem.is_unsigned:
        return 2**elem.bits - 1 if high else 0
    return 2 ** (elem.bits - 1) - 1 if high else -(2 ** (elem.bits - 1))


@dataclass
class TileBuilder:
    """Emits one tile function's ops, with fresh names and the intervals of its scalars."""

    name: str
    tiling: KernelTiling
    params: list[Value] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    taken: set[str] = field(default_factory=set)
    scalars: ScalarIntervals = field(default_factory=ScalarIntervals)
    memo: dict[Any, Value] = field(default_factory=dict)
    k_steps: int = 1  # trips of the K loop this function is the body of

    def fresh(self, hint: str) -> str:
        name, n = hint, 0
        while name in self.taken:
            n += 1
            name = f"{hint}.{n}"
        self.taken.add(name)
        return name

    def param(self, hint: str, t: TensorType) -> Value:
        v = Value(self.fresh(hint), t)
        self.params.append(v)
        return v

    def capture(self, outer: TileBuilder, values: list[Value]) -> dict[str, Value]:
        """Parameters of this (loop body) builder for ``values`` of ``outer``, by outer name; a
        scalar keeps the interval ``outer`` knows for it, so bounds proofs see through the loop."""
        inner: dict[str, Value] = {}
        for v in values:
            inner[v.name] = self.param(v.name, v.type)
            if outer.scalars.of(v) is not None:
                self.scalars.intervals[inner[v.name].name] = outer.scalars.of(v)  # type: ignore[assignment]
        return inner

    def emit(self, opcode: str, operands: list[Value], result: TensorType | None, hint: str = "t",
             **attrs: Any) -> Value | None:
        results = [Value(self.fresh(hint), result)] if result is not None else []
        op = Op.make(opcode, operands, results, **attrs)
        self.ops.append(op)
        self.scalars.add(op)
        return results[0] if results else None

    def value(self, opcode: str, operands: list[Value], result: TensorType, hint: str = "t", **attrs: Any) -> Value:
        v = self.emit(opcode, operands, result, hint, **attrs)
        assert v is not None
        return v

    def const(self, value: Any, t: TensorType = SCALAR) -> Value:
        key = ("const", value, t)
        if key not in self.memo:
            self.memo[key] = self.value("constant", [], t, "c", value=value, dtype=str(t.elem), shape=t.shape)
        return self.memo[key]

    def program_id(self, axis: int) -> Value:
        key = ("pid", axis)
        if key not in self.memo:
            size = self.tiling.launch_grid[axis]
            self.memo[key] = self.value("program_id", [], SCALAR, f"g{axis}", axis=axis, size=size)
        return self.memo[key]

    def index(self, expr: IndexExpr, pids: dict[int, Value] | None = None) -> Value:
        """The block index ``const + sum(coef * program id)`` as scalar ops (shared when repeated)."""
        const, terms = expr
        key = ("index", expr, tuple(sorted((pids or {}).items(), key=lambda kv: kv[0])) if pids else None)
        if key in self.memo:
            return self.memo[key]
        acc: Value | None = None
        for coef, axis in terms:
            g = pids[axis] if pids is not None else self.program_id(axis)
            term = g if coef == 1 else self.value("mul", [g, self.const(coef)], SCALAR, "i")
            acc = term if acc is None else self.value("add", [acc, term], SCALAR, "i")
        if acc is None:
            acc = self.const(const)
        elif const:
            acc = self.value("add", [acc, self.const(const)], SCALAR, "i")
        self.memo[key] = acc
        return acc

    def access(self, opcode: str, ref: Value, indices: list[Value], blocks: tuple[int | None, ...],
               array: TensorType, value: Value | None = None, hint: str = "t", when: Value | None = None,
               **attrs: Any) -> Value | None:
        """A load (returning the tile) or store of the block at ``indices``, masked on every
        dimension whose blocks can reach past ``array``'s end (and, given ``when``, an i1[]
        scalar, done only where it is true)."""
        masked = []
        for d, (index, block) in enumerate(zip(indices, blocks)):
            interval = self.scalars.of(index)
            if block is not None and (interval is None or overhangs(interval[1], block, array.shape[d])):
                masked.append(d)
        squeeze = [d for d, b in enumerate(blocks) if b is None]
        block_attr = [1 if b is None else b for b in blocks]
        if masked:
            attrs["masked"] = masked
        if when is not None:
            attrs["when"] = True
        if masked or when is not None:
            if opcode == "load":
                attrs.setdefault("other", False if array.elem == BOOL else 0.0 if array.elem.is_float else 0)
        if squeeze:
            attrs["squeeze"] = squeeze
        tile = TensorType(array.elem, tuple(b for b in blocks if b is not None))
        operands = [ref] + ([value] if value is not None else []) + indices + ([when] if when is not None else [])
        return self.emit(opcode, operands, tile if opcode == "load" else None, hint, block=block_attr, **attrs)

    def function(self, returns: list[Value]) -> Function:
        return Function(self.name, tuple(self.params), tuple(self.ops), tuple(returns))
