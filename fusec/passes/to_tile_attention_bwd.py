"""The FlashAttention-2 backward of an attention kernel, as three tile programs.

Given O, dO and the forward's per-row log-sum-exp (``lse``, f32[B, Tq]):

- ``pre``: ``D = rowsum(dO * O)`` (f32[B, Tq]), one program per (batch-head, query block);
- ``dkv``: one program per (batch-head, key block) loops over the query blocks that see it,
  recomputing ``P = exp(x - lse)`` from Q, K and the user's score chain, and accumulates
  ``dV += P^T dO`` and ``dK += dS^T Q`` with ``dS = chain'(P * (dO V^T - D))``;
- ``dq``: one program per (batch-head, query block) loops over the key blocks it sees and
  accumulates ``dQ += dS K``.

Both loops skip the blocks a causal or sliding-window band hides (:mod:`attention_band`). The
gradients are written per query head in the canonical layout (f32[B, T, D], B the scores' batch):
the runtime sums a GQA group and lays them out as the kernel's operands. ``chain'`` is the score
chain differentiated op by op (:func:`chain_gradient_problem` says which chains it can do).
"""

from __future__ import annotations

from collections.abc import Callable

from fusec.errors import FusecError
from fusec.ir import Function, Op, TensorType, Value
from fusec.ir.types import BOOL, F32, I32
from fusec.passes.attention_match import AttentionMatch, match_attention
from fusec.passes.tile_builder import SCALAR, TileBuilder
from fusec.passes.tiling import pow2_at_least
from fusec.passes.to_tile_attention import _PRECISION, _AttentionLowering

PARTS = ("pre", "dkv", "dq")
_IDENTITY = ("reshape", "transpose", "convert")
_GRADIENT_OPS = (*_IDENTITY, "add", "sub", "neg", "mul", "div", "select", "tanh")


def chain_gradient_problem(m: AttentionMatch) -> str | None:
    """Why the backward kernels cannot differentiate ``m``'s score chain, or None when they can."""
    for op in m.chain:
        if op.opcode not in _GRADIENT_OPS:
            return f"the score chain's {op.opcode} has no fused gradient"
        pos = [i for i, v in enumerate(op.operands) if v.name in m.labels]
        if len(pos) != 1:
            return f"the score chain's {op.opcode} reads the scores {len(pos)} times"
        if (op.opcode == "div" and pos[0] != 0) or (op.opcode == "select" and pos[0] == 0):
            return f"the score chain's {op.opcode} takes the scores as operand {pos[0]}"
    return None


class _BackwardLowering(_AttentionLowering):
    def __init__(self, op: Op, callee: Function, m: AttentionMatch) -> None:
        super().__init__(op, callee, m)
        self.part = str(op.attr("part"))
        block, step = self.t.block[1], int(self.t.bk or 1)
        self.bq, self.bk = (step, block) if self.part == "dkv" else (block, step)
        self.dvp = pow2_at_least(m.value_dim)
        self.rows_first = self.first(m.out.roles, "q", "d")

    def prec(self, dot: Op) -> dict[str, object]:
        return {key: dot.attr(key) for key in _PRECISION if dot.attr(key) is not None}

    def f32(self, b: TileBuilder, v: Value) -> Value:
        return v if v.type.elem == F32 else b.value("convert", [v], v.type.with_elem(F32), "f", dtype="f32")

    def to(self, b: TileBuilder, v: Value, elem: object) -> Value:
        return v if v.type.elem == elem else b.value("convert", [v], v.type.with_elem(elem), "c",  # type: ignore[arg-type]
                                                     dtype=str(elem))

    def lower(self) -> list[Function]:
        m = self.m
        b = TileBuilder(f"{self.callee.name}.tile", self.t)
        g0, g1 = b.program_id(0), b.program_id(1)
        if self.part == "pre":
            o_ref, do_ref = b.param("o", m.out.value.type), b.param("do", m.out.value.type)
            d_ref = b.param("out0", TensorType(F32, (m.batch, m.tq)))
            o, do = (self.f32(b, self.load_do(b, r, g0, g1)) for r in (o_ref, do_ref))
            prod = b.value("mul", [o, do], o.type, "od")
            d = b.value("reduce", [prod], TensorType(F32, (self.bq,)), "dd", axes=(1 if self.rows_first else 0,),
                        kind="sum")
            b.access("store", d_ref, [g0, g1], (None, self.bq), d_ref.type, d, "dd")
            return [b.function([])]
        refs = {p.name: b.param(f"in{i}", p.type) for i, p in enumerate(self.callee.params)}
        row_t = TensorType(F32, (m.batch, m.tq))
        do_ref, lse_ref, dd_ref = b.param("do", m.out.value.type), b.param("lse", row_t), b.param("dd", row_t)
        extra = {"do": do_ref, "lse": lse_ref, "dd": dd_ref}
        if self.part == "dq":
            outs = [b.param("out0", TensorType(F32, (m.batch, m.tq, m.head_dim)))]
        else:
            outs = [b.param("out0", TensorType(F32, (m.batch, m.tk, m.head_dim))),
                    b.param("out1", TensorType(F32, (m.batch, m.tk, m.value_dim)))]
        self.body_refs = refs
        self.outer_g = (g0, g1)
        zero = b.const(0)
        if self.part == "dq":
            fixed = self.query_side(b, refs, extra, g0, g1)
            inits = [b.const(0.0, TensorType(F32, (self.bq, self.dp)))]
            bounds, trips = self.kv_bounds(b, g1), -(-m.tk // self.bk)
        else:
            fixed = self.key_side(b, refs, g0, g1)
            inits = [b.const(0.0, TensorType(F32, (self.bk, self.dp))),
                     b.const(0.0, TensorType(F32, (self.bk, self.dvp)))]
            bounds, trips = self.q_bounds(b, g1), -(-m.tq // self.bq)
        captured = [*refs.values(), *extra.values(), g0, g1, *fixed.values()]
        bodies: list[Function] = []
        results = self.loop(b, inits, captured, bounds, trips, bodies,
                            lambda body, inner, i, carried: self.step_bwd(body, inner, i, carried, refs, extra, fixed))
        for out, acc, dim in zip(outs, results, (self.dp, self.dvp)):
            b.access("store", out, [g0, g1, zero], (None, acc.type.shape[0], dim), out.type, acc, "grad")
        return [b.function([]), *bodies]

    def load_do(self, b: TileBuilder, ref: Value, g0: Value, qi: Value) -> Value:
        tile = self.access(b, "load", ref, self.m.out.roles, {"q": (qi, self.bq), "d": (b.const(0), self.dvp)}, g0,
                           hint="do")
        assert tile is not None
        return tile

    def load_qk(self, b: TileBuilder, which: str, refs: dict[str, Value], g0: Value, index: Value) -> Value:
        m = self.m
        operand, axis, block = (m.q, "q", self.bq) if which == "q" else (m.k, "k", self.bk)
        tile = self.access(b, "load", refs[operand.value.name], operand.roles,
                           {axis: (index, block), "d": (b.const(0), self.dp)}, g0, hint=which, offset=operand.offset)
        assert tile is not None
        return tile

    def load_v(self, b: TileBuilder, refs: dict[str, Value], g0: Value, kk: Value) -> Value:
        m = self.m
        tile = self.access(b, "load", refs[m.v.value.name], m.v.roles, {"k": (kk, self.bk), "d": (
            b.const(0), self.dvp)}, g0, hint="v", offset=m.v.offset)
        assert tile is not None
        return tile

    def rows(self, b: TileBuilder, ref: Value, g0: Value, qi: Value, hint: str) -> Value:
        tile = b.access("load", ref, [g0, qi], (None, self.bq), ref.type, hint=hint)
        assert tile is not None
        return tile

    def query_side(self, b: TileBuilder, refs: dict[str, Value], extra: dict[str, Value], g0: Value,
                   qi: Value) -> dict[str, Value]:
        """What a query block brings to a step: Q, dO (in V's dtype), lse (0 for a row with no key),
        D."""
        q = self.load_qk(b, "q", refs, g0, qi)
        do = self.to(b, self.load_do(b, extra["do"], g0, qi), self.m.v.value.type.elem)
        lse = self.rows(b, extra["lse"], g0, qi, "lse")
        dead = b.value("eq", [lse, b.const(float("-inf"), lse.type)], lse.type.with_elem(BOOL), "dead")
        lse = b.value("select", [dead, lse, b.const(0.0, lse.type)], lse.type, "lse")
        return {"q": q, "do": do, "lse": lse, "dd": self.rows(b, extra["dd"], g0, qi, "dd")}

    def key_side(self, b: TileBuilder, refs: dict[str, Value], g0: Value, kk: Value) -> dict[str, Value]:
        return {"k": self.load_qk(b, "k", refs, g0, kk), "v": self.load_v(b, refs, g0, kk)}

    def loop(self, b: TileBuilder, inits: list[Value], captured: list[Value], bounds: list[Value], trips: int,
             bodies: list[Function], step: Callable[..., list[Value]]) -> list[Value]:
        """A loop over ``trips`` blocks (within ``bounds``) whose body ``step`` makes."""
        body = TileBuilder(f"{b.name}.loop", self.t)
        index = body.param("i", SCALAR)
        body.scalars.intervals[index.name] = (0, max(0, trips - 1))
        carried = [body.param("acc", v.type) for v in inits]
        inner = body.capture(b, captured)
        returns = step(body, inner, index, carried)
        results = [Value(b.fresh("acc.out"), v.type) for v in inits]
        b.ops.append(Op.make("loop", [*inits, *captured, *bounds], results, body=body.name, trips=trips,
                             carried=len(inits), **({"bounded": True} if bounds else {})))
        bodies.append(body.function(returns))
        return results

    def q_bounds(self, b: TileBuilder, g1: Value) -> list[Value]:
        """``[start, stop]`` of the query blocks that see key block ``g1`` (queries ``k0 - hi ..
        k1 - 1 - lo``), or ``[]`` for all of them."""
        band, bq, bk, tq = self.band, self.bq, self.bk, self.m.tq
        trips = -(-tq // bq)
        if band is None or trips <= 1:
            return []
        k0 = g1 if bk == 1 else b.value("mul", [g1, b.const(bk)], SCALAR, "k0")
        start = b.const(0)
        if band.hi != float("inf"):
            first = b.value("sub", [k0, b.const(int(band.hi))], SCALAR, "i0")
            first = b.value("max", [first, b.const(0)], SCALAR, "i0")
            start = b.value("div", [first, b.const(bq)], SCALAR, "q0")
        end = b.const(tq)
        if band.lo != float("-inf"):
            end = b.value("add", [k0, b.const(bk - int(band.lo))], SCALAR, "i1")
            end = b.value("max", [b.value("min", [end, b.const(tq)], SCALAR, "i1"), b.const(0)], SCALAR, "i1")
        stop = b.value("div", [b.value("add", [end, b.const(bq - 1)], SCALAR, "q1"), b.const(bq)], SCALAR, "q1")
        return [start, stop]

    def step_bwd(self, b: TileBuilder, inner: dict[str, Value], i: Value, carried: list[Value],
                 refs: dict[str, Value], extra: dict[str, Value], fixed: dict[str, Value]) -> list[Value]:
        m, bq, bk = self.m, self.bq, self.bk
        body_refs = {name: inner[r.name] for name, r in refs.items()}
        body_extra = {name: inner[r.name] for name, r in extra.items()}
        g0, g1 = (inner[v.name] for v in self.outer_g)
        self.body_refs = body_refs
        if self.part == "dq":
            side = {k: inner[v.name] for k, v in fixed.items()}
            side.update(self.key_side(b, body_refs, g0, i))
            self.g = (g0, g1, i)
            kk, qi = i, g1
        else:
            side = {k: inner[v.name] for k, v in fixed.items()}
            side.update(self.query_side(b, body_refs, body_extra, g0, i))
            self.g = (g0, i, g1)
            kk, qi = g1, i
        scores = TensorType(F32, (bq, bk))
        x = self.scores(b, side["q"], side["k"], kk)
        lse = b.value("broadcast", [side["lse"]], scores, "lseb", dims=(0,), shape=scores.shape)
        p = b.value("exp", [b.value("sub", [x, lse], scores, "xs")], scores, "p")
        if self.part == "dkv" and m.tq % bq:  # queries past the end take no part
            rows = b.value("element_index", [qi], scores.with_elem(I32), "rows", block=bq, dimension=0,
                           shape=scores.shape)
            inside = b.value("lt", [rows, b.const(m.tq, scores.with_elem(I32))], scores.with_elem(BOOL), "inside")
            p = b.value("select", [inside, b.const(0.0, scores), p], scores, "p")
        do, v, q, k = side["do"], side["v"], side["q"], side["k"]
        do_t = not self.rows_first
        v_t = not self.first(m.v.roles, "k", "d")
        q_t = not self.first(m.q.roles, "q", "d")
        k_t = not self.first(m.k.roles, "k", "d")
        dpv = b.value("dot_acc", [b.const(0.0, scores), do, v], scores, "dp", lhs_t=do_t, rhs_t=not v_t,
                      **self.prec(m.pv))
        dd = b.value("broadcast", [side["dd"]], scores, "ddb", dims=(0,), shape=scores.shape)
        ds = b.value("mul", [p, b.value("sub", [dpv, dd], scores, "dpd")], scores, "ds")
        ds = self.chain_grad(b, ds)
        if self.part == "dq":
            (dq,) = carried
            dq = b.value("dot_acc", [dq, self.to(b, ds, k.type.elem), k], dq.type, "dq", lhs_t=False, rhs_t=k_t,
                         **self.prec(m.qk))
            return [dq]
        dk, dv = carried
        dv = b.value("dot_acc", [dv, self.to(b, p, do.type.elem), do], dv.type, "dv", lhs_t=True, rhs_t=do_t,
                     **self.prec(m.pv))
        dk = b.value("dot_acc", [dk, self.to(b, ds, q.type.elem), q], dk.type, "dk", lhs_t=True, rhs_t=q_t,
                     **self.prec(m.qk))
        return [dk, dv]

    def chain_grad(self, b: TileBuilder, g: Value) -> Value:
        """``g``, the gradient of the softmax input, carried back through the score chain to the
        scores (f32, from the values ``scores`` kept)."""
        m = self.m
        zero = b.const(0.0, g.type)
        for op in reversed(m.chain):
            if op.opcode in _IDENTITY:
                continue
            pos = next(i for i, v in enumerate(op.operands) if v.name in m.labels)
            labels = m.labels[op.result.name]
            others = [self.f32(b, self.tiles[v.name] if v.name in self.tiles else
                               self.side(b, v, labels if v.type.shape else ())) if i != pos else None
                      for i, v in enumerate(op.operands)]
            if op.opcode == "sub" and pos == 1 or op.opcode == "neg":
                g = b.value("neg", [g], g.type, "g")
            elif op.opcode == "mul":
                g = b.value("mul", [g, others[1 - pos]], g.type, "g")  # type: ignore[list-item]
            elif op.opcode == "div":
                g = b.value("div", [g, others[1]], g.type, "g")  # type: ignore[list-item]
            elif op.opcode == "select":  # where(pred, on_true = operand 2, on_false = operand 1)
                pred = self.tiles.get(op.operands[0].name) or self.side(b, op.operands[0], labels)
                g = b.value("select", [pred, zero, g] if pos == 2 else [pred, g, zero], g.type, "g")
            elif op.opcode == "tanh":
                y = self.f32(b, self.tiles[op.result.name])
                one = b.const(1.0, g.type)
                g = b.value("mul", [g, b.value("sub", [one, b.value("mul", [y, y], g.type, "y2")], g.type, "dy")],
                            g.type, "g")
        return g


def lower_attention_backward(op: Op, callee: Function) -> list[Function]:
    """The tile program of one backward part (``op``'s ``part``) and its loop's body."""
    qk = next((o for o in callee.ops if o.opcode == "dot"), None)
    m = match_attention(callee, qk) if qk is not None else None
    if m is None:
        raise FusecError(f"kernel {callee.name}: its ops are no longer an attention fusec recognises")
    return _BackwardLowering(op, callee, m).lower()

