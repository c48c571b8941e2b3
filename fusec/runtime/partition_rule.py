"""How a kernel splits over devices, read off its graph-level ops (no JAX here).

Every dimension of every operand and result gets a *factor*: dimensions that must be split alike
share one (an elementwise op's operands and result, a dot's batch/M/N axes and its result's, a
dot's K axes). A factor is *contracted* when a dot sums over it, *blocked* when splitting it would
change the answer (a reduction or iota along it, a reshape that merges it, a view that offsets or
strides it, a low-bit weight). :func:`local_kernel_op` re-types the kernel for one shard's
shapes, given how many pieces each factor is cut into.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fusec.ir import OPDEFS, Builder, Function, LowBitType, Module, Op, TensorType, Value
from fusec.passes.views import View

Key = tuple[str, int]  # (value name, dimension)


@dataclass(frozen=True)
class PartitionRule:
    """Factor names per dimension of each operand and result; ``blocked`` factors stay whole;
    ``contracted`` ones are summed by the kernel's dot. When ``additive`` is not None a contracted
    factor may be split: each shard runs the kernel on its slice of K, the operands in ``additive``
    (which the kernel only adds to the dot's result) are given to one shard only, and a psum adds
    the shards' results. ``sizes`` is each factor's extent."""

    operands: tuple[tuple[str, ...], ...]
    results: tuple[tuple[str, ...], ...]
    sizes: dict[str, int]
    blocked: frozenset[str]
    contracted: frozenset[str]
    additive: tuple[int, ...] | None

    def factors(self) -> list[str]:
        """Every factor, in order of first appearance (the order Shardy numbers them in)."""
        seen: dict[str, None] = {}
        for row in (*self.operands, *self.results):
            seen.update(dict.fromkeys(row))
        return list(seen)

    def splittable(self, factor: str) -> bool:
        if factor in self.blocked or self.sizes[factor] <= 1:
            return False
        return factor not in self.contracted or self.additive is not None

    def einsum(self) -> str:
        """The rule in Shardy's einsum-like notation: ``"f0 f1, f1 f2 -> f0 f2"``."""
        side = lambda dims: ", ".join(" ".join(d) for d in dims)  # noqa: E731
        return f"{side(self.operands)} -> {side(self.results)}"


class _Factors:
    def __init__(self) -> None:
        self.parent: dict[Key, Key] = {}
        self.blocked: set[Key] = set()
        self.contracted: set[Key] = set()

    def find(self, k: Key) -> Key:
        self.parent.setdefault(k, k)
        while self.parent[k] != k:
            self.parent[k] = self.parent[self.parent[k]]
            k = self.parent[k]
        return k

    def union(self, a: Key, b: Key) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def block(self, v: Value, dims: Any = None) -> None:
        for d in range(v.type.rank) if dims is None else dims:
            self.blocked.add((v.name, d))


def _reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Groups of source and destination dimensions with equal products (size-1 dims left out)."""
    a = [d for d, n in enumerate(src) if n != 1]
    b = [d for d, n in enumerate(dst) if n != 1]
    groups, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        ga, gb = [a[i]], [b[j]]
        pa, pb = src[a[i]], dst[b[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                ga.append(a[i])
                pa *= src[a[i]]
                i += 1
            elif pb < pa and j < len(b):
                gb.append(b[j])
                pb *= dst[b[j]]
                j += 1
            else:
                return None
        groups.append((ga, gb))
    return groups if i == len(a) and j == len(b) else None


def _same(f: _Factors, a: Value, da: int, b: Value, db: int) -> None:
    if a.type.shape[da] == b.type.shape[db]:
        f.union((a.name, da), (b.name, db))
    else:
        f.block(a, [da])
        f.block(b, [db])


def _op_factors(f: _Factors, op: Op) -> None:  # noqa: C901  (one case per op family)
    kind = OPDEFS[op.opcode].kind if op.opcode in OPDEFS else "opaque"
    r = op.results[0] if op.results else None
    if kind == "elementwise":
        for v in op.operands:
            if v.type.rank == 0:
                continue
            if v.type.shape != r.type.shape:
                f.block(v)
                f.block(r)
                continue
            for d in range(v.type.rank):
                f.union((v.name, d), (r.name, d))
    elif op.opcode == "broadcast":
        x = op.operands[0]
        for i, d in enumerate(op.attr("dims")):
            if x.type.shape[i] == r.type.shape[d]:
                f.union((x.name, i), (r.name, d))
    elif op.opcode == "reshape":
        x = op.operands[0]
        groups = _reshape_groups(x.type.shape, r.type.shape)
        if groups is None:
            f.block(x)
            f.block(r)
            return
        for ga, gb in groups:
            if len(ga) == 1 or len(gb) == 1:
                # Contiguous pieces of the outermost of merged dimensions are contiguous pieces of
                # the merged one ([B, H] -> [B * H] splits along B): one factor, the inner
                # dimensions whole (the rule's sizes are the gcd of a factor's extents).
                f.union((x.name, ga[0]), (r.name, gb[0]))
                f.block(x, ga[1:])
                f.block(r, gb[1:])
            else:
                f.block(x, ga)
                f.block(r, gb)
    elif op.opcode == "transpose":
        for k, p in enumerate(op.attr("perm")):
            f.union((op.operands[0].name, p), (r.name, k))
    elif op.opcode in ("reduce", "argmax", "argmin"):
        x, axes = op.operands[0], tuple(op.attr("axes"))
        f.block(x, axes)
        kept = [d for d in range(x.type.rank) if d not in axes]
        for k, d in enumerate(kept):
            f.union((x.name, d), (r.name, k))
    elif op.opcode == "dot":
        lhs, rhs = op.operands
        nb = lhs.type.rank - 2
        for d in range(nb):
            _same(f, lhs, d, r, d)
            _same(f, rhs, d, r, d)
        m, kl = (nb + 1, nb) if op.attr("lhs_t") else (nb, nb + 1)
        kr, n = (nb + 1, nb) if op.attr("rhs_t") else (nb, nb + 1)
        f.union((lhs.name, m), (r.name, nb))
        f.union((rhs.name, n), (r.name, nb + 1))
        f.union((lhs.name, kl), (rhs.name, kr))
        f.contracted.add((lhs.name, kl))
    elif op.opcode == "iota":
        f.block(r, [int(op.attr("dimension"))])
    elif op.opcode == "constant":
        pass
    elif op.opcode == "slice":
        x = op.operands[0]
        for d, (lo, hi, st) in enumerate(zip(op.attr("start"), op.attr("limit"), op.attr("strides"))):
            if lo == 0 and st == 1 and hi == x.type.shape[d]:
                f.union((x.name, d), (r.name, d))
            else:
                f.block(x, [d])
                f.block(r, [d])
    else:  # concatenate, dequantize, calls, opaque: kept whole
        for v in (*op.operands, *op.results):
            f.block(v)


def _view_map(view: View, shape: tuple[int, ...]) -> dict[int, int]:
    """View dimension -> base dimension, for the view's dimensions that are the base's unchanged."""
    out = {}
    for k, a in enumerate(view.axis):
        if view.coef[k] == 1 and view.offset[a] == 0 and shape[k] == view.base_shape[a]:
            out[k] = a
    return out


def _views(op: Op, key: str) -> dict[int, View]:
    return {int(i): View.decode(v) for i, v in op.attr(key, ())}


def partition_rule(op: Op, callee: Function) -> PartitionRule | None:
    """The rule of kernel op ``op`` over its graph-level ``callee``; None if it has low-bit operands."""
    if any(isinstance(v.type.elem, LowBitType) for v in (*op.operands, *callee.params)):
        return None
    f = _Factors()
    for o in callee.ops:
        _op_factors(f, o)
    roots: dict[Key, str] = {}
    sizes: dict[str, int] = {}
    blocked: set[str] = set()
    contracted: set[str] = set()

    def name(k: Key, size: int) -> str:
        root = f.find(k)
        if root not in roots:
            roots[root] = f"f{len(roots)}"
            sizes[roots[root]] = size
        return roots[root]

    # Factors of the kernel's own operands and results (through their views where they have one).
    def dims(values: tuple[Value, ...], inner: tuple[Value, ...], views: dict[int, View],
             tag: str) -> list[tuple[str, ...]]:
        out = []
        for i, (outer, v) in enumerate(zip(values, inner)):
            view_map = _view_map(views[i], v.type.shape) if i in views else {k: k for k in range(v.type.rank)}
            unmapped.extend((v.name, k) for k in range(v.type.rank) if k not in view_map)
            base_of = {a: k for k, a in view_map.items()}
            row = []
            for d in range(outer.type.rank):
                if d in base_of:
                    row.append(name((v.name, base_of[d]), outer.type.shape[d]))
                else:
                    fresh = f"{tag}{i}_{d}"
                    sizes[fresh] = outer.type.shape[d]
                    blocked.add(fresh)
                    row.append(fresh)
            out.append(tuple(row))
        return out

    unmapped: list[Key] = []  # callee dimensions a view strides or offsets: their factors stay whole
    operands = dims(op.operands, callee.params, _views(op, "in_views"), "in")
    results = dims(op.results, callee.returns, _views(op, "out_views"), "out")
    for k in (*f.blocked, *unmapped):
        if f.find(k) in roots:
            blocked.add(roots[f.find(k)])
    for k in f.contracted:
        if f.find(k) in roots:
            contracted.add(roots[f.find(k)])
    # A factor splits into pieces that divide every extent it has inside the kernel too.
    extents = {v.name: v.type.shape for v in (*callee.params, *(r for o in callee.ops for r in o.results))}
    for k in list(f.parent):
        root = f.find(k)
        if root in roots and k[0] in extents:
            sizes[roots[root]] = math.gcd(sizes[roots[root]], extents[k[0]][k[1]])
    # A factor on some dimension that is not the whole of a viewed array stays whole.
    for row in (*operands, *results):
        blocked.update(x for x in row if x.startswith(("in", "out")))
    return PartitionRule(tuple(operands), tuple(results), sizes, frozenset(blocked), frozenset(contracted),
                         _additive_operands(callee))


_LINEAR = ("add", "broadcast", "reshape", "transpose", "convert")


def _additive_operands(callee: Function) -> tuple[int, ...] | None:
    """Parameters the kernel only adds to its one dot's result (``acc + x + b``), when its one
    result is that sum; None when a split K could not be summed across shards afterwards."""
    dots = [o for o in callee.ops if o.opcode == "dot"]
    if len(dots) != 1 or len(callee.returns) != 1:
        return None
    producer = {r.name: o for o in callee.ops for r in o.results}
    depends: dict[str, bool] = {}  # value -> whether it depends on the dot

    def on_dot(v: Value) -> bool:
        if v.name not in depends:
            o = producer.get(v.name)
            depends[v.name] = o is not None and (o is dots[0] or any(on_dot(x) for x in o.operands))
        return depends[v.name]

    params = {p.name: i for i, p in enumerate(callee.params)}
    side: set[int] = set()

    def linear_in_params(v: Value) -> bool:  # built from parameters by adds and moves only
        if v.name in params:
            side.add(params[v.name])
            return True
        o = producer.get(v.name)
        return o is not None and o.opcode in _LINEAR and all(linear_in_params(x) for x in o.operands)

    v = callee.returns[0]
    while v.name != dots[0].result.name:
        o = producer.get(v.name)
        if o is None or o.opcode not in ("add", "convert"):
            return None
        chain = [x for x in o.operands if on_dot(x)]
        if len(chain) != 1 or not all(linear_in_params(x) for x in o.operands if not on_dot(x)):
            return None
        v = chain[0]
    dot_inputs = {p for p, i in params.items() if any(_reaches(producer, x, p) for x in dots[0].operands)}
    if any(callee.params[i].name in dot_inputs for i in side):
        return None
    return tuple(sorted(side))


def _reaches(producer: dict[str, Op], v: Value, param: str) -> bool:
    if v.name == param:
        return True
    o = producer.get(v.name)
    return o is not None and any(_reaches(producer, x, param) for x in o.operands)


def _scaled(t: TensorType, row: tuple[str, ...], pieces: dict[str, int]) -> TensorType:
    return t.with_shape(tuple(n // pieces.get(x, 1) for n, x in zip(t.shape, row)))


def local_kernel_op(op: Op, module: Module, rule: PartitionRule, pieces: dict[str, int]) -> tuple[Op, Function]:
    """The kernel op and graph-level callee for one shard, when factor ``x`` is cut into
    ``pieces[x]`` equal parts (tiling attributes dropped: the caller tiles it again)."""
    callee = module.function(str(op.attr("callee")))
    f = _Factors()
    for o in callee.ops:
        _op_factors(f, o)
    # The factor of each callee dimension, named as the rule names the kernel's operands'.
    named: dict[Key, str] = {}
    for _, inner, key, rows in ((op.operands, callee.params, "in_views", rule.operands),
                                (op.results, callee.returns, "out_views", rule.results)):
        views = _views(op, key)
        for i, v in enumerate(inner):
            view_map = _view_map(views[i], v.type.shape) if i in views else {k: k for k in range(v.type.rank)}
            for k, a in view_map.items():
                named[f.find((v.name, k))] = rows[i][a]

    def new_type(v: Value) -> TensorType:
        row = tuple(named.get(f.find((v.name, d)), "") for d in range(v.type.rank))
        return _scaled(v.type, row, pieces)

    b = Builder(f"{callee.name}.shard")
    env: dict[str, Value] = {}
    for p in callee.params:
        env[p.name] = b.param(new_type(p), p.name)
    for o in callee.ops:
        attrs = dict(o.attr_dict)
        want = [new_type(r) for r in o.results]
        if "shape" in attrs and o.opcode != "dequantize":
            attrs["shape"] = want[0].shape
        if o.opcode == "slice":  # a whole dimension stays whole in the shard (a split one is never sliced)
            local_in = env[o.operands[0].name].type.shape
            attrs["limit"] = tuple(local_in[d] if (lo, hi) == (0, o.operands[0].type.shape[d]) else hi
                                   for d, (lo, hi) in enumerate(zip(attrs["start"], attrs["limit"])))
        outs = b.op_multi(o.opcode, [env[x.name] for x in o.operands], **attrs)
        if [v.type for v in outs] != want:
            raise ValueError(f"re-typing {o.opcode} gave {[str(v.type) for v in outs]}, expected {want}")
        for r, v in zip(o.results, outs):
            env[r.name] = v
    local = b.finish([env[r.name] for r in callee.returns])

    def rescale_views(key: str, rows: tuple[tuple[str, ...], ...]) -> tuple:
        out = []
        for i, view in _views(op, key).items():
            base = tuple(n // pieces.get(x, 1) for n, x in zip(view.base_shape, rows[i]))
            out.append((i, View(base, view.axis, view.coef, view.offset).encode()))
        return tuple(out)

    operands = tuple(Value(v.name, _scaled(v.type, rule.operands[i], pieces)) for i, v in enumerate(op.operands))
    results = tuple(Value(v.name, _scaled(v.type, rule.results[i], pieces)) for i, v in enumerate(op.results))
    space = tuple(op.attr("space"))
    anchor = _space_anchor(str(op.attr("kind")), callee, space)
    attrs = {k: v for k, v in op.attr_dict.items() if k not in ("tile", "in_views", "out_views")}
    attrs |= {"callee": local.name, "space": new_type(anchor).shape if anchor is not None else space}
    if op.attr("kind") == "attention":  # (batch-heads, Tq, Dv) of the shard, whatever its arrays' layout
        from fusec.passes.attention_match import match_attention

        m = match_attention(local, next(o for o in local.ops if o.opcode == "dot"))
        if m is None:
            raise ValueError(f"kernel {callee.name}: its shard is no longer an attention")
        attrs["space"] = (m.batch, m.tq, m.value_dim)
    if op.attr("in_views") is not None:
        attrs["in_views"] = rescale_views("in_views", rule.operands)
    if op.attr("out_views") is not None:
        attrs["out_views"] = rescale_views("out_views", rule.results)
    return Op(op.opcode, operands, results, Op.make("kernel", **attrs).attrs, op.loc), local


def _space_anchor(kind: str, callee: Function, space: tuple[int, ...]) -> Value | None:
    """The callee value whose shape is the kernel's iteration space."""
    if kind == "matmul":
        candidates = [o.result for o in callee.ops if o.opcode == "dot"]
    elif kind == "reduction":
        candidates = [o.operands[0] for o in callee.ops if o.opcode == "reduce"]
    else:
        candidates = list(callee.returns)
    candidates += [*callee.params, *(r for o in callee.ops for r in o.results)]
    return next((v for v in candidates if v.type.shape == space), None)
