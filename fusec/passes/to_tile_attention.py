"""The tile program of an attention kernel: a FlashAttention-2 forward.

One program per (batch-head, query block): it loads its query block once, then loops over key
blocks carrying the running row maximum ``m``, the running sum ``l`` and the output accumulator
(all f32). Each step recomputes the scores block ``Q K^T``, replays the user's score chain on it
(scales, masks from element indices, loaded biases and padding masks: the same ops the reference
runs), hides keys past the end, and folds the block into ``m``, ``l`` and the accumulator; the
result is ``acc / l``. A row whose every score is -inf gives NaN, as the reference's softmax does.
Arrays are addressed by the labels :mod:`fusec.passes.attention_match` gives their dimensions.
A causal or sliding-window mask bounds the key loop to the blocks its band reaches
(:mod:`fusec.passes.attention_band`); a kernel op with a second result also stores each row's
log-sum-exp (f32[B, Tq]) for the fused backward (:mod:`fusec.passes.to_tile_attention_bwd`).
"""

from __future__ import annotations

from fusec.errors import FusecError
from fusec.ir import Function, KernelTiling, Op, TensorType, Value
from fusec.ir.types import BOOL, F32, I32
from fusec.passes.attention_band import attention_band
from fusec.passes.attention_labels import Labels, Operand, broadcast_source_labels
from fusec.passes.attention_match import AttentionMatch, match_attention
from fusec.passes.tile_builder import SCALAR, TileBuilder
from fusec.passes.tiling import pow2_at_least

_PRECISION = ("precision", "precision_pair", "algorithm")


class _AttentionLowering:
    def __init__(self, op: Op, callee: Function, m: AttentionMatch) -> None:
        self.op, self.callee, self.m = op, callee, m
        self.t = KernelTiling.from_attrs(op.attr_dict)
        self.bq, self.bk = self.t.block[1], int(self.t.bk or 32)
        self.dp = pow2_at_least(m.head_dim)
        self.producer = {r.name: o for o in callee.ops for r in o.results}
        self.band = attention_band(callee, m)

    def batch_index(self, b: TileBuilder, g0: Value, label: tuple[str, int, int]) -> Value:
        """The index along a batch-factor dimension: ``(g0 // stride) % size``."""
        if label[0] != "b":
            return b.const(0)
        _, stride, size = label
        x = g0 if stride == 1 else b.value("div", [g0, b.const(stride)], SCALAR, "i")
        interval = b.scalars.of(x)
        if interval is None or interval[1] >= size:
            x = b.value("rem", [x, b.const(size)], SCALAR, "i")
        return x

    def access(self, b: TileBuilder, opcode: str, ref: Value, roles: Labels, seq: dict[str, tuple[Value, int]],
               g0: Value, value: Value | None = None, hint: str = "t", offset: int = 0) -> Value | None:
        indices, blocks = [], []
        for role in roles:
            if role[0] in seq:
                index, block = seq[role[0]]
                indices.append(index)
                blocks.append(block)
            elif role[0] == "m":  # a merged heads axis: the head's block of the head-dim axis
                index = self.batch_index(b, g0, ("b", role[1], role[2]))
                indices.append(index if not offset else b.value("add", [index, b.const(offset)], SCALAR, "i"))
                blocks.append(seq["d"][1])
            else:
                indices.append(self.batch_index(b, g0, role))
                blocks.append(None)
        return b.access(opcode, ref, indices, tuple(blocks), ref.type, value, hint)

    @staticmethod
    def first(roles: Labels, a: str, b: str) -> bool:
        """Whether the dimension labelled ``a`` comes before the one labelled ``b``."""
        kinds = ["d" if r[0] == "m" else r[0] for r in roles]
        return kinds.index(a) < kinds.index(b)

    def lower(self) -> list[Function]:
        m, t, bq, bk = self.m, self.t, self.bq, self.bk
        b = TileBuilder(f"{self.callee.name}.tile", t)
        refs = {p.name: b.param(f"in{i}", p.type) for i, p in enumerate(self.callee.params)}
        out = b.param("out0", self.op.results[0].type)
        if len(self.op.results) == 2:
            b.param("out1", self.op.results[1].type)
        g0, g1 = b.program_id(0), b.program_id(1)
        zero = b.const(0)
        q_tile = self.access(b, "load", refs[m.q.value.name], m.q.roles, {"q": (g1, bq), "d": (zero, self.dp)}, g0,
                             hint="q", offset=m.q.offset)
        assert q_tile is not None
        dvp = t.block[2]
        rows_first = self.first(m.out.roles, "q", "d")
        acc_type = TensorType(F32, (bq, dvp) if rows_first else (dvp, bq))
        row = TensorType(F32, (bq,))
        inits = [b.const(float("-inf"), row), b.const(0.0, row), b.const(0.0, acc_type)]
        captured = [*refs.values(), g0, g1, q_tile]
        body = TileBuilder(f"{self.callee.name}.tile.kv", t)
        kk = body.param("kk", SCALAR)
        trips = -(-m.tk // bk)
        body.scalars.intervals[kk.name] = (0, max(0, trips - 1))
        carried = [body.param(hint, v.type) for hint, v in zip(("m", "l", "acc"), inits)]
        inner = body.capture(b, captured)
        self.body_refs = {name: inner[r.name] for name, r in refs.items()}
        self.g = (inner[g0.name], inner[g1.name], kk)
        returns = self.step(body, inner[q_tile.name], *carried, rows_first)
        results = [Value(b.fresh(f"{hint}.out"), v.type) for hint, v in zip(("m", "l", "acc"), inits)]
        bounds = self.kv_bounds(b, g1)
        b.ops.append(Op.make("loop", [*inits, *captured, *bounds], results, body=body.name, trips=trips, carried=3,
                             **({"bounded": True} if bounds else {})))
        m_out, l_out, acc_out = results
        lb = b.value("broadcast", [l_out], acc_type, "lb", dims=(0,) if rows_first else (1,), shape=acc_type.shape)
        o = b.value("div", [acc_out, lb], acc_type, "o")
        elem = out.type.elem
        if elem != F32:
            o = b.value("convert", [o], acc_type.with_elem(elem), "o", dtype=str(elem))
        self.access(b, "store", out, m.out.roles, {"q": (g1, bq), "d": (zero, dvp)}, g0, o)
        if len(self.op.results) == 2:  # the rows' log-sum-exp, f32[B, Tq], for the backward
            self.store_lse(b, m_out, l_out, g0, g1)
        return [b.function([]), body.function(returns)]

    def kv_bounds(self, b: TileBuilder, g1: Value) -> list[Value]:
        """``[start, stop]`` of the key blocks query block ``g1`` visits (causal block skipping), or
        ``[]`` when it visits all of them."""
        band, bq, bk = self.band, self.bq, self.bk
        trips = -(-self.m.tk // bk)
        if band is None or trips <= 1:
            return []
        q0 = g1 if bq == 1 else b.value("mul", [g1, b.const(bq)], SCALAR, "q0")
        first = b.const(0)
        if band.lo != float("-inf"):
            first = b.value("max", [b.value("add", [q0, b.const(int(band.lo))], SCALAR, "j0"), b.const(0)], SCALAR,
                            "j0")
        end = b.const(self.m.tk)
        if band.hi != float("inf"):
            end = b.value("min", [b.value("add", [q0, b.const(bq + int(band.hi))], SCALAR, "j1"),
                                  b.const(self.m.tk)], SCALAR, "j1")
            if bq + band.hi < 0:  # a band below the diagonal: the first query blocks see no key
                end = b.value("max", [end, b.const(0)], SCALAR, "j1")
        start = first if bk == 1 or band.lo == float("-inf") else b.value("div", [first, b.const(bk)], SCALAR, "kv0")
        stop = b.value("div", [b.value("add", [end, b.const(bk - 1)], SCALAR, "kv1"), b.const(bk)], SCALAR, "kv1")
        return [start, stop]

    def store_lse(self, b: TileBuilder, m_out: Value, l_out: Value, g0: Value, g1: Value) -> None:
        row = m_out.type
        dead = b.value("eq", [m_out, b.const(float("-inf"), row)], row.with_elem(BOOL), "dead")
        m_safe = b.value("select", [dead, m_out, b.const(0.0, row)], row, "ms")
        lse = b.value("add", [m_safe, b.value("log", [l_out], row, "logl")], row, "lse")
        out = b.params[-1]
        b.access("store", out, [g0, g1], (None, self.bq), out.type, lse, "lse")

    def load_kv(self, b: TileBuilder, operand: Operand, kk: Value, dblock: int, hint: str) -> Value:
        """Key block ``kk`` of K or V (``operand``), its head-dim axis in one ``dblock`` block."""
        tile = self.access(b, "load", self.body_refs[operand.value.name], operand.roles,
                           {"k": (kk, self.bk), "d": (b.const(0), dblock)}, self.g[0], hint=hint, offset=operand.offset)
        assert tile is not None
        return tile

    def tail_masked(self) -> bool:
        """Whether some key block reaches past the last key."""
        return self.m.tk % self.bk != 0

    def step(self, b: TileBuilder, q_tile: Value, m_prev: Value, l_prev: Value, acc: Value,
             rows_first: bool) -> list[Value]:
        """One key block: scores, the user's chain, the tail mask, the online softmax update."""
        m = self.m
        g0, g1, kk = self.g
        k_tile = self.load_kv(b, m.k, kk, self.dp, "k")
        x = self.scores(b, q_tile, k_tile, kk)
        scores = x.type
        row = m_prev.type
        m_new = b.value("max", [m_prev, b.value("reduce", [x], row, "mx", axes=(1,), kind="max")], row, "m")
        # A row with no finite score yet subtracts 0, not -inf (which would make NaN of -inf - -inf).
        dead = b.value("eq", [m_new, b.const(float("-inf"), row)], row.with_elem(BOOL), "dead")
        m_safe = b.value("select", [dead, m_new, b.const(0.0, row)], row, "ms")
        alpha = b.value("exp", [b.value("sub", [m_prev, m_safe], row, "d")], row, "alpha")
        ms = b.value("broadcast", [m_safe], scores, "msb", dims=(0,), shape=scores.shape)
        p = b.value("exp", [b.value("sub", [x, ms], scores, "d")], scores, "p")
        l_new = b.value("add", [b.value("mul", [l_prev, alpha], row, "l"),
                                b.value("reduce", [p], row, "ps", axes=(1,), kind="sum")], row, "l")
        ab = b.value("broadcast", [alpha], acc.type, "ab", dims=(0,) if rows_first else (1,), shape=acc.type.shape)
        acc = b.value("mul", [acc, ab], acc.type, "acc")
        v_elem = m.v.value.type.elem
        if v_elem != F32:
            p = b.value("convert", [p], scores.with_elem(v_elem), "p", dtype=str(v_elem))
        v_tile = self.load_kv(b, m.v, kk, self.t.block[2], "v")
        k_first = self.first(m.v.roles, "k", "d")
        precision = {key: m.pv.attr(key) for key in _PRECISION if m.pv.attr(key) is not None}
        if rows_first:  # acc[q, d] += p @ v
            acc = b.value("dot_acc", [acc, p, v_tile], acc.type, "acc", lhs_t=False, rhs_t=not k_first, **precision)
        else:  # acc[d, q] += v^T p^T
            acc = b.value("dot_acc", [acc, v_tile, p], acc.type, "acc", lhs_t=k_first, rhs_t=True, **precision)
        return [m_new, l_new, acc]

    def scores(self, b: TileBuilder, q_tile: Value, k_tile: Value, kk: Value) -> Value:
        """The softmax input of one [bq, bk] block, f32: ``Q K^T``, the user's chain replayed
        (its values kept in ``self.tiles``), keys past the end set to -inf."""
        m, bq, bk = self.m, self.bq, self.bk
        scores = TensorType(F32, (bq, bk))
        precision = {key: m.qk.attr(key) for key in _PRECISION if m.qk.attr(key) is not None}
        s = b.value("dot_acc", [b.const(0.0, scores), q_tile, k_tile], scores, "s",
                    lhs_t=not self.first(m.q.roles, "q", "d"), rhs_t=self.first(m.k.roles, "k", "d"), **precision)
        elem = m.qk.result.type.elem
        if elem != F32:
            s = b.value("convert", [s], scores.with_elem(elem), "s", dtype=str(elem))
        self.tiles: dict[str, Value] = {m.qk.result.name: s}
        self.memo: dict[tuple[str, Labels], Value] = {}
        for op in m.chain:
            src = self.tiles[op.operands[0].name] if op.opcode in ("reshape", "transpose", "stop_gradient") else None
            if src is not None:
                self.tiles[op.result.name] = src
                continue
            labels = m.labels[op.result.name]
            args = [self.tiles[v.name] if v.name in self.tiles else self.side(b, v, labels if v.type.shape else ())
                    for v in op.operands]
            self.tiles[op.result.name] = b.value(op.opcode, args, scores.with_elem(op.result.type.elem), "x",
                                                 **op.attr_dict)
        x = self.tiles[m.x.name]
        if x.type.elem != F32:
            x = b.value("convert", [x], scores, "x", dtype="f32")
        neg_inf = b.const(float("-inf"), scores)
        if self.tail_masked():  # keys past the end take no part
            cols = b.value("element_index", [kk], scores.with_elem(I32), "cols", block=bk, dimension=1,
                           shape=scores.shape)
            inside = b.value("lt", [cols, b.const(m.tk, scores.with_elem(I32))], scores.with_elem(BOOL), "inside")
            x = b.value("select", [inside, neg_inf, x], scores, "x")
        return x

    def side(self, b: TileBuilder, v: Value, labels: Labels) -> Value:
        """A side operand of the chain (with ``labels``) as a full [bq, bk] tile."""
        key = (v.name, labels)
        if key in self.memo:
            return self.memo[key]
        m, bq, bk = self.m, self.bq, self.bk
        g0, g1, kk = self.g
        full = TensorType(v.type.elem, (bq, bk))
        kind, op = m.sides[key], self.producer.get(v.name)
        if kind == "const":
            assert op is not None
            tile = b.const(op.attr("value"), full)
        elif kind == "iota":
            assert op is not None
            axis = labels[int(op.attr("dimension"))][0]
            if axis == "1":
                tile = b.const(0, full.with_elem(I32))
            else:
                index, block, dim = (g1, bq, 0) if axis == "q" else (kk, bk, 1)
                tile = b.value("element_index", [index], full.with_elem(I32), "iota", block=block, dimension=dim,
                               shape=full.shape)
            if full.elem != I32:
                tile = b.value("convert", [tile], full, "iota", dtype=str(full.elem))
        elif kind == "op":
            assert op is not None
            if op.opcode == "broadcast":
                tile = self.side(b, op.operands[0], broadcast_source_labels(op, labels))
            else:
                args = [self.side(b, u, labels if u.type.shape else ()) for u in op.operands]
                tile = b.value(op.opcode, args, full, "m", **op.attr_dict)
        else:
            tile = self.load_input(b, Operand(v, labels), full)
        self.memo[key] = tile
        return tile

    def load_input(self, b: TileBuilder, operand: Operand, full: TensorType) -> Value:
        g0, g1, kk = self.g
        ref = self.body_refs[operand.value.name]
        tile = self.access(b, "load", ref, operand.roles, {"q": (g1, self.bq), "k": (kk, self.bk)}, g0, hint="side")
        assert tile is not None
        kinds = [r[0] for r in operand.roles if r[0] in ("q", "k")]
        if kinds == ["q", "k"]:
            return tile
        dims = tuple(0 if k == "q" else 1 for k in kinds)
        return b.value("broadcast", [tile], full, "side", dims=dims, shape=full.shape)


def lower_attention(op: Op, callee: Function) -> list[Function]:
    """The tile program of an attention kernel op (first) and its key loop's body."""
    qk = next((o for o in callee.ops if o.opcode == "dot"), None)
    m = match_attention(callee, qk) if qk is not None else None
    if m is None:
        raise FusecError(f"kernel {callee.name}: its ops are no longer an attention fusec recognises")
    return _AttentionLowering(op, callee, m).lower()
