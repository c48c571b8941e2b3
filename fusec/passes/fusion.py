"""Fusion: groups ops into kernels, each a ``kernel`` op calling a function of its ops.

Three kinds of group, each over an iteration space S (a shape):
- ``elementwise``: elementwise ops of shape S, with broadcasts of their inputs folded into loads;
- ``reduction``: adds reductions over a set of S's axes (its last by default; any, held whole in
  one block), elementwise work on the reduced rows ("row space", S less those axes) and
  broadcasts of rows back to S: softmax on any axis, layernorm, rmsnorm, GroupNorm statistics;
- ``matmul``: a ``dot`` of shape S with its elementwise epilogue (bias, activation, residual, cast)
  and, as prologue, the ``dequantize`` of a packed low-bit weight, unpacked inside the K loop.

Ops join the group of one of their operands when that is legal; groups over one space that meet at
an op merge (sibling matmuls only when they read the same lhs, which they then load once); a join
or merge that would make a path leave the group and come back (a cycle through an op outside it)
is refused, kernels taken whole (what any member reads). Splat constants and iotas are cloned
into every kernel that uses them, except as a dot's operands (its K loop reads kernel inputs).
Ops a kernel cannot hold (see ``KERNEL_ELEMENTWISE``) stay outside and run through XLA.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from fusec.ir import DType, Function, LowBitType, Module, Op, Value, parse_elem_type
from fusec.ir.graph import op_graph, stable_toposort
from fusec.passes.base import Pass, register_pass
from fusec.passes.fusion_kernel import FusionGroup as _Group
from fusec.passes.fusion_kernel import extract_kernel as _extract
from fusec.passes.fusion_rules import (
    KERNEL_ELEMENTWISE,
    KIND_PRIORITY,
    TARGET,
    clonable,
    fits,
    reducible,
    row_shape,
    space_ok,
    types_ok,
)
from fusec.passes.rewrite import fresh_name


class _Fuser:
    def __init__(self, func: Function, max_ops: int) -> None:
        self.func = func
        self.max_ops = max_ops
        self.producer = {r.name: op for op in func.ops for r in op.results}
        self.position = {id(op): i for i, op in enumerate(func.ops)}
        self.uses = func.uses()
        self.groups: dict[int, _Group] = {}
        self.group_of: dict[str, int] = {}  # value name -> group id
        self.deps: dict[str, frozenset[int]] = {}  # value name -> groups it depends on
        # Group g -> group h: a member of g reads a value that depends on h (merges contract nodes).
        self.reads = nx.DiGraph()
        # Broadcasts left outside every group: a consumer's kernel loads their source expanded.
        self.absorbable: set[str] = set()
        self.cloned_dequantize: set[str] = set()  # low-bit weights a matmul kernel unpacks from its own copy
        self.merged_into: dict[int, int] = {}
        self.next_id = 0

    def find(self, gid: int) -> int:
        while gid in self.merged_into:
            gid = self.merged_into[gid]
        return gid

    def _depends_on(self, v: Value, gid: int) -> bool:
        """Whether ``v`` depends on group ``gid``, kernels taken whole: a kernel computes all its
        values at once, so a value of a group depends on everything any member of that group
        reads, including members that joined after the value was made (paths in ``reads``)."""
        sources = {self.find(x) for x in self.deps.get(v.name, ())}
        if gid in sources:
            return True
        if gid not in self.reads:
            return False
        return not sources.isdisjoint(nx.ancestors(self.reads, gid))

    def _record_reads(self, g: _Group, op: Op) -> None:
        """Adds the groups that ``op``, now a member of ``g``, reads from outside ``g``."""
        self.reads.add_node(g.id)
        for v in op.operands:
            if v.name not in g.values:
                outside = {self.find(x) for x in self.deps.get(v.name, ())} - {g.id}
                self.reads.add_edges_from((g.id, h) for h in outside)

    def _dots(self, g: _Group) -> list[Op]:
        return [self.func.ops[i] for i in g.members if self.func.ops[i].opcode == "dot"]

    def _share_lhs(self, a: _Group, b: _Group) -> bool:
        """Sibling matmuls (Q/K/V, gate/up) that read the same lhs can share its loads."""
        dots = self._dots(a) + self._dots(b)
        lhs = {(d.operands[0].name, d.attr("lhs_t"), d.operands[0].type) for d in dots}
        rhs_k = {(d.operands[1].type.shape[-1] if d.attr("rhs_t") else d.operands[1].type.shape[-2]) for d in dots}
        outside = all(d.operands[0].name not in a.values | b.values for d in dots)
        return len(lhs) == 1 and len(rhs_k) == 1 and outside and len(dots) <= 4

    def _try_merge(self, a: _Group, b: _Group) -> bool:
        """Merges ``b`` into ``a`` (siblings over one space) unless that is illegal."""
        kinds = {a.kind, b.kind}
        if a.space != b.space or kinds == {"matmul", "reduction"}:
            return False
        if None not in (a.reduce_axes, b.reduce_axes) and a.reduce_axes != b.reduce_axes:
            return False
        if kinds == {"matmul"} and not self._share_lhs(a, b):
            return False
        if len(a.members) + len(b.members) > self.max_ops:
            return False
        both = a.values | b.values
        for g, other in ((a, b), (b, a)):
            for i in g.members:
                for v in self.func.ops[i].operands:
                    # A path from one group to the other through an outside op would become a cycle.
                    if v.name not in both and self._depends_on(v, other.id):
                        return False
        kind = "matmul" if "matmul" in kinds else ("reduction" if "reduction" in kinds else "elementwise")
        if kind == "matmul":
            probe = _Group(a.id, kind, a.space, values=both)
            for g in (a, b):
                for i in g.members:
                    op = self.func.ops[i]
                    if op.opcode in ("dot", "dequantize"):
                        continue  # their operands are read by the K loop
                    if any(v.type.rank != len(a.space) for v in (*op.operands, *op.results)
                           if v.name in both or not clonable(self.producer.get(v.name))) or \
                            not all(self._loadable(v, probe) for v in op.operands if v.name not in both):
                        return False
        a.kind = kind
        a.reduce_axes = a.reduce_axes if a.reduce_axes is not None else b.reduce_axes
        a.members = sorted(a.members + b.members)
        a.values = both
        for name in b.values:
            self.group_of[name] = a.id
        self.merged_into[b.id] = a.id
        if b.id in self.reads:
            self.reads.add_node(a.id)
            nx.contracted_nodes(self.reads, a.id, b.id, self_loops=False, copy=False)
        del self.groups[b.id]
        return True

    # -- legality --------------------------------------------------------------------------------
    def _loadable(self, v: Value, g: _Group) -> bool:
        """Whether ``v``, defined outside ``g``, can be an input of g's kernel."""
        if clonable(self.producer.get(v.name)):
            return True
        if v.name in self.absorbable:
            return v.type.rank == len(g.space) and fits(v.type.shape, g.space, False)
        return fits(v.type.shape, g.space, g.kind != "matmul", g.row_axes)

    def _joins(self, op: Op, g: _Group) -> bool:
        s, out = g.space, op.results[0].type.shape
        inside = [v for v in op.operands if v.name in g.values]
        outside = [v for v in op.operands if v.name not in g.values]
        rows = g.kind != "matmul"
        if op.opcode == "dot":
            return False
        if op.opcode == "broadcast":
            src = op.operands[0]
            if not inside or not fits(out, s, False):
                return False
            same_rank = src.type.rank == len(out) and op.attr("dims") == tuple(range(len(out)))
            kept = tuple(d for d in range(len(s)) if d not in g.row_axes)
            row_to_full = rows and src.type.shape == row_shape(s, g.row_axes) and op.attr("dims") == kept
            return same_rank or row_to_full
        if op.opcode == "reduce":
            v = op.operands[0]
            axes = tuple(op.attr("axes"))
            # A group without reduced axes yet takes any, if it holds no rows of the default (last) one.
            free = g.reduce_axes is None and not self._has_rows(g)
            return (rows and bool(inside) and v.type.shape == s and (axes == g.row_axes or free)
                    and reducible(s, axes) and op.attr("kind") in TARGET.reduce_kinds)
        return fits(out, s, rows, g.row_axes) and all(self._loadable(v, g) for v in outside)

    def _has_rows(self, g: _Group) -> bool:
        ops = [self.func.ops[i] for i in g.members]
        return any(v.type.rank != len(g.space) for op in ops for v in (*op.operands, *op.results))

    def _start(self, op: Op) -> _Group | None:
        out = op.results[0].type.shape
        gid = self.next_id
        self.next_id += 1
        if op.opcode == "dot":
            lhs = op.operands[0].type
            ok = (op.result.type.rank in (2, 3) and space_ok(out) and lhs.elem.name in TARGET.dot_dtypes  # type: ignore[union-attr]
                  and lhs.shape[-1] > 0 and lhs.shape[-2] > 0)
            if not ok:
                return None
            g = _Group(gid, "matmul", out)
            dq = self.producer.get(op.operands[1].name)
            if dq is not None and self._dequantize_prologue(op, dq):
                # The packed weight is unpacked in registers inside the matmul's K loop; a weight
                # other ops also read (a tied embedding's gather) is unpacked by a copy in the kernel.
                if self.uses.get(dq.result.name) == 1:
                    g.members.append(self.position[id(dq)])
                    g.values.add(dq.result.name)
                    self.group_of[dq.result.name] = gid
                else:
                    self.cloned_dequantize.add(dq.result.name)
            return g
        if op.opcode == "reduce":
            s = op.operands[0].type.shape
            axes = tuple(op.attr("axes"))
            ok = space_ok(s) and reducible(s, axes) and op.attr("kind") in TARGET.reduce_kinds
            return _Group(gid, "reduction", s, reduce_axes=axes) if ok else None
        if op.opcode == "broadcast" or not space_ok(out):
            return None
        g = _Group(gid, "elementwise", out)
        return g if all(self._loadable(v, g) for v in op.operands) else None

    def _dequantize_prologue(self, dot: Op, dq: Op) -> bool:
        """Whether ``dq`` (a dequantize feeding ``dot``'s rhs) can be unpacked inside the matmul:
        a [K, N] weight read untransposed (any format)."""
        if dq.opcode != "dequantize" or dot.attr("rhs_t") or dot.result.type.rank != 2:
            return False
        return isinstance(parse_elem_type(str(dq.attr("format"))), LowBitType)

    def _fusible(self, op: Op) -> bool:
        if len(op.results) != 1 or not types_ok(op):
            return False
        if op.opcode == "select" and (len(op.operands) != 3 or op.operands[0].type.elem != DType("bool")):
            return False
        return op.opcode in KERNEL_ELEMENTWISE or op.opcode in ("broadcast", "reduce", "dot")

    # -- grouping --------------------------------------------------------------------------------
    def group(self) -> None:
        for i, op in enumerate(self.func.ops):
            deps = frozenset().union(*(self.deps.get(v.name, frozenset()) for v in op.operands))
            chosen: _Group | None = None
            if self._fusible(op):
                candidates = sorted({self.find(self.group_of[v.name]) for v in op.operands if v.name in self.group_of},
                                    key=lambda g: (KIND_PRIORITY[self.groups[g].kind], g))
                # Sibling groups over the same space that meet at this op become one kernel.
                for other in candidates[1:]:
                    if self._try_merge(self.groups[candidates[0]], self.groups[other]):
                        candidates.remove(other)
                for gid in candidates:
                    g = self.groups[gid]
                    if len(g.members) >= self.max_ops:
                        continue
                    # Joining must not close a cycle: no operand from outside may depend on the group.
                    if any(self._depends_on(v, gid) for v in op.operands if v.name not in g.values):
                        continue
                    if self._joins(op, g):
                        chosen = g
                        break
                if chosen is None:
                    chosen = self._start(op)
                    if chosen is not None:
                        self.groups[chosen.id] = chosen
                if chosen is None and op.opcode == "broadcast":
                    self.absorbable.add(op.result.name)
            if chosen is None:
                for r in op.results:
                    self.deps[r.name] = deps
                continue
            self._record_reads(chosen, op)
            chosen.members.append(i)
            result = op.results[0]
            chosen.values.add(result.name)
            if op.opcode == "reduce":
                chosen.kind = "reduction"
                chosen.reduce_axes = tuple(op.attr("axes"))
            self.group_of[result.name] = chosen.id
            self.deps[result.name] = frozenset(self.find(x) for x in deps) | {chosen.id}


def fuse_function(func: Function, max_ops: int, names: set[str]) -> tuple[Function, list[Function]]:
    """``func`` with its fusible ops replaced by kernel ops, and the kernels' functions."""
    fuser = _Fuser(func, max_ops)
    fuser.group()
    groups = [g for g in fuser.groups.values() if g.members]
    in_group = {i: g.id for g in groups for i in g.members}
    used_outside: set[str] = {v.name for v in func.returns}
    for i, op in enumerate(func.ops):
        for v in op.operands:
            if fuser.group_of.get(v.name) is not None and in_group.get(i) != fuser.group_of[v.name]:
                used_outside.add(v.name)
    units: list[tuple[float, Op]] = [(float(i), op) for i, op in enumerate(func.ops) if i not in in_group]
    # New value names (kernel parameters, reshaped inputs) must be fresh in the whole function.
    taken = {p.name for p in func.params} | {r.name for op in func.ops for r in op.results}
    kernels: list[Function] = []
    for number, g in enumerate(groups):
        name = fresh_name(f"{func.name}.k{number}", names)
        pre, kernel, kfunc = _extract(fuser, g, name, used_outside, taken)
        last = float(max(g.members))
        units += [(last - 0.5, p) for p in pre] + [(last, kernel)]
        kernels.append(kfunc)
    units.sort(key=lambda u: u[0])
    draft = Function(func.name, func.params, tuple(op for _, op in units), func.returns)
    order = stable_toposort(op_graph(draft), {i: i for i in range(len(units))})
    return Function(func.name, func.params, tuple(draft.ops[i] for i in order), func.returns), kernels


@register_pass
@dataclass(frozen=True)
class Fuse(Pass):
    """Groups ops into ``kernel`` ops (see the module docstring); ``max_ops`` caps a kernel's size."""

    name = "fuse"
    max_ops: int = 64

    def run(self, module: Module) -> Module:
        names = {f.name for f in module.functions}
        out: list[Function] = []
        kernels: list[Function] = []
        # Kernels' own functions are left alone; a function that calls kernels already (a second
        # fuse, after split-epilogue) has its remaining ops grouped around them.
        callees = {str(op.attr(key)) for f in module.functions for op in f.ops if op.opcode == "kernel"
                   for key in ("callee", "tile") if op.attr(key) is not None}
        for f in module.functions:
            if f.name in callees or f.name.startswith(tuple(c + "." for c in callees)) or \
                    f.name in {k.name for k in kernels}:
                out.append(f)
                continue
            fused, ks = fuse_function(f, self.max_ops, names)
            out.append(fused)
            kernels += ks
        return module.replace_functions(out + kernels)
