"""How a tile program's arrays become Pallas refs: one ``BlockSpec`` per array, and the in-kernel
slices and masks of each load and store.

A dimension every access indexes with the same function of program ids only goes into the
BlockSpec's index map (Pallas then moves the block); a dimension some access indexes by a loop
index (the matmul's K) gets a BlockSpec block as long as the accesses reach, at block index 0, and
each access slices it with ``pl.ds``. Masks come from the tile program's ``masked`` attributes:
Pallas's Triton lowering never masks by itself, and interpret mode pads partial blocks, so an
unmasked overhanging access is wrong on a GPU and looks right on a CPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fusec.codegen.pallas_text import literal
from fusec.errors import FusecError
from fusec.ir import Function, Module, Op, ScalarIntervals, TensorType
from fusec.ir.tile_ops import ACCESS_OPS, access_indices, loop_inputs
from fusec.ir.tile_verify import loop_index_interval

_INDEX_OPS = {"add": "+", "sub": "-", "mul": "*", "div": "//", "rem": "%"}


def identifier(name: str) -> str:
    return re.sub(r"\W", "_", name)


@dataclass
class _Access:
    op: Op
    exprs: list[str | None]  # per dimension: the index as a function of g, None if it depends on a loop


@dataclass(frozen=True)
class RefPlan:
    """One array of the kernel as a Pallas ref."""

    ref: str
    array: TensorType
    blocks: tuple[int | None, ...]  # the BlockSpec's block (None: squeezed)
    index: tuple[str, ...]  # the BlockSpec's index map, over the grid variables g
    sliced: frozenset[int]  # dimensions each access slices in the kernel

    @property
    def spec(self) -> str:
        blocks = "(" + "".join(f"{b}, " for b in self.blocks) + ")"
        return f"pl.BlockSpec({blocks}, lambda *g: ({''.join(f'{e}, ' for e in self.index)}))"


@dataclass
class _Walk:
    module: Module
    accesses: dict[str, list[_Access]] = field(default_factory=dict)
    reach: dict[tuple[str, int], int] = field(default_factory=dict)

    def run(self, func: Function, exprs: dict[str, str], scalars: ScalarIntervals, alias: dict[str, str]) -> None:
        for op in func.ops:
            if op.opcode == "program_id":
                exprs[op.result.name] = f"g[{op.attr('axis')}]"
            elif op.opcode == "constant" and op.result.type.shape == () and isinstance(op.attr("value"), int):
                exprs[op.result.name] = str(op.attr("value"))
            elif op.opcode in _INDEX_OPS and op.result.type.shape == () and \
                    all(v.name in exprs for v in op.operands):
                a, b = (exprs[v.name] for v in op.operands)
                exprs[op.result.name] = f"({a} {_INDEX_OPS[op.opcode]} {b})"
            elif op.opcode in ACCESS_OPS:
                self.record(op, exprs, scalars, alias)
            elif op.opcode == "loop":
                body = self.module.function(str(op.attr("body")))
                inner = ScalarIntervals({body.params[0].name: loop_index_interval(op, scalars)})
                inner_exprs: dict[str, str] = {}
                inner_alias: dict[str, str] = {}
                for p, v in zip(body.params[1:], loop_inputs(op)):
                    if scalars.of(v) is not None:
                        inner.intervals[p.name] = scalars.of(v)  # type: ignore[assignment]
                    if v.name in exprs:
                        inner_exprs[p.name] = exprs[v.name]
                    if v.name in alias:
                        inner_alias[p.name] = alias[v.name]
                self.run(body, inner_exprs, inner, inner_alias)
            scalars.add(op)

    def record(self, op: Op, exprs: dict[str, str], scalars: ScalarIntervals, alias: dict[str, str]) -> None:
        ref = alias[op.operands[0].name]
        indices = access_indices(op)
        self.accesses.setdefault(ref, []).append(_Access(op, [exprs.get(v.name) for v in indices]))
        for d, (v, b) in enumerate(zip(indices, op.attr("block"))):
            interval = scalars.of(v)
            hi = interval[1] if interval is not None else op.operands[0].type.shape[d]
            self.reach[(ref, d)] = max(self.reach.get((ref, d), 0), (hi + 1) * b)


def plan_refs(module: Module, program: Function) -> dict[str, RefPlan]:
    """Each of ``program``'s arrays (by parameter name) as a Pallas ref."""
    walk = _Walk(module)
    walk.run(program, {}, ScalarIntervals(), {p.name: p.name for p in program.params})
    plans = {}
    for p in program.params:
        accesses = walk.accesses.get(p.name, [])
        blocks: list[int | None] = []
        index: list[str] = []
        sliced = set()
        for d, size in enumerate(p.type.shape):
            squeezed = {d in a.op.attr("squeeze", ()) for a in accesses}
            sizes = {a.op.attr("block")[d] for a in accesses}
            exprs = {a.exprs[d] for a in accesses}
            if not accesses:
                blocks.append(size)
                index.append("0")
            elif len(exprs) == 1 and None not in exprs and len(sizes) == 1 and len(squeezed) == 1:
                blocks.append(None if squeezed.pop() else sizes.pop())
                index.append(str(exprs.pop()))
            elif True in squeezed:
                raise FusecError(f"array %{p.name}: dimension {d} is squeezed by one access and sliced by another")
            else:
                blocks.append(walk.reach[(p.name, d)])
                index.append("0")
                sliced.add(d)
        plans[p.name] = RefPlan(identifier(p.name), p.type, tuple(blocks), tuple(index), frozenset(sliced))
    return plans


def access_source(plan: RefPlan, op: Op, index_names: list[str], value: str | None = None,
                  when: str | None = None) -> str:
    """The source of a load (an expression) or store/atomic add (a statement) of ``op``'s block
    (``when``: the variable holding its predicate)."""
    block = op.attr("block")
    target = plan.ref
    if plan.sliced:
        parts = [f"pl.ds({index_names[d]} * {block[d]}, {block[d]})" if d in plan.sliced else ":"
                 for d, b in enumerate(plan.blocks) if b is not None]
        target = f"{plan.ref}.at[{', '.join(parts)}]"
    kept = [d for d in range(len(block)) if d not in op.attr("squeeze", ())]
    shape = tuple(block[d] for d in kept)
    terms = []
    for d in op.attr("masked", ()):
        start = "" if index_names[d] == "0" else f" + {index_names[d]} * {block[d]}"
        terms.append(f"(lax.broadcasted_iota(jnp.int32, {shape}, {kept.index(d)}){start} < {plan.array.shape[d]})")
    if when is not None:
        terms.append(f"jnp.broadcast_to({when}, {shape})")
    mask = " & ".join(terms)
    if op.opcode == "load":
        if not mask:
            return f"{target}[...]"
        other = op.attr("other")
        fill = f"jnp.zeros((), {plan.ref}.dtype)" if not other else f"jnp.full((), {literal(other)}, {plan.ref}.dtype)"
        return f"plgpu.load({target}, mask={mask}, other={fill})"
    if op.opcode == "atomic_add":
        if not mask:
            return f"plgpu.atomic_add({target}, (...,), {value})"
        # Interpret mode has no masked atomics (it pads partial blocks): add zeros there instead.
        return (f"plgpu.atomic_add({target}, (...,), jnp.where({mask}, {value}, 0), "
                f"mask=({mask}) if _on_gpu else None)")
    if not mask:
        return f"{target}[...] = {value}"
    return f"plgpu.store({target}, {value}, mask={mask})"
