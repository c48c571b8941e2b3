"""The tile program of a split-decode attention kernel (see :mod:`fusec.passes.decode_split`).

Program ``(b, s)`` of the grid ``(batch-heads, S)`` loads its (at most 16) query rows once, runs
the FlashAttention-2 online softmax of :mod:`fusec.passes.to_tile_attention` over the key blocks
``s * c / bk .. (s + 1) * c / bk - 1`` of its chunk (keys past the end masked to -inf, the same
score chain replayed per block), and stores the unnormalised accumulator, the row maximum and the
row sum, all f32, at ``[b, s]`` of the three partials arrays.
"""

from __future__ import annotations

from fusec.errors import FusecError
from fusec.ir import Function, Op, TensorType, Value
from fusec.ir.types import F32
from fusec.passes.attention_match import AttentionMatch, match_attention
from fusec.passes.tile_builder import SCALAR, TileBuilder
from fusec.passes.tiling import pow2_at_least
from fusec.passes.to_tile_attention import _AttentionLowering

MIN_ROWS = 16  # a tensor-core dot's rows: the query tile is padded (and masked) to them


class _DecodeLowering(_AttentionLowering):
    def __init__(self, op: Op, pattern: Function, m: AttentionMatch) -> None:
        super().__init__(op, pattern, m)
        self.bq = max(MIN_ROWS, pow2_at_least(m.tq))
        self.s, self.c = int(op.attr("decode_split")), int(op.attr("decode_chunk"))
        if self.c % self.bk:
            raise FusecError(f"kernel {op.attr('callee')}: key block {self.bk} does not divide the chunk {self.c}")
        self.per = self.c // self.bk
        self.name = str(op.attr("callee"))

    def tail_masked(self) -> bool:
        return self.s * self.c > self.m.tk

    def lower(self) -> list[Function]:
        m, t, bq = self.m, self.t, self.bq
        b = TileBuilder(f"{self.name}.tile", t)
        refs = {p.name: b.param(f"in{i}", p.type) for i, p in enumerate(self.callee.params)}
        outs = [b.param(f"out{j}", r.type) for j, r in enumerate(self.op.results)]
        g0, gs = b.program_id(0), b.program_id(1)
        zero = b.const(0)
        q_tile = self.access(b, "load", refs[m.q.value.name], m.q.roles, {"q": (zero, bq), "d": (zero, self.dp)}, g0,
                             hint="q", offset=m.q.offset)
        assert q_tile is not None
        dvp = t.block[2]
        acc_type, row = TensorType(F32, (bq, dvp)), TensorType(F32, (bq,))
        inits = [b.const(float("-inf"), row), b.const(0.0, row), b.const(0.0, acc_type)]
        captured = [*refs.values(), g0, gs, q_tile]
        body = TileBuilder(f"{self.name}.tile.kv", t)
        kk = body.param("kk", SCALAR)
        body.scalars.intervals[kk.name] = (0, self.per - 1)
        carried = [body.param(hint, v.type) for hint, v in zip(("m", "l", "acc"), inits)]
        inner = {}
        for v in captured:
            inner[v.name] = body.param(v.name, v.type)
            if b.scalars.of(v) is not None:
                body.scalars.intervals[inner[v.name].name] = b.scalars.of(v)  # type: ignore[assignment]
        self.body_refs = {name: inner[r.name] for name, r in refs.items()}
        # Constants are named "c", "c.1", ... in each function and the code writer shares them by
        # name: the body's "c" is 0, as the program's is.
        body.const(0)
        first = body.value("mul", [inner[gs.name], body.const(self.per)], SCALAR, "kb")
        block = body.value("add", [first, kk], SCALAR, "kb")  # the key block, counted from key 0
        self.g = (inner[g0.name], body.const(0), block)
        returns = self.step(body, inner[q_tile.name], *carried, True)
        results = [Value(b.fresh(f"{hint}.out"), v.type) for hint, v in zip(("m", "l", "acc"), inits)]
        b.ops.append(Op.make("loop", [*inits, *captured], results, body=body.name, trips=self.per, carried=3))
        m_out, l_out, acc_out = results
        b.access("store", outs[0], [g0, gs, zero, zero], (None, None, bq, dvp), outs[0].type, acc_out, "o")
        for ref, value in zip(outs[1:], (m_out, l_out)):
            b.access("store", ref, [g0, gs, zero], (None, None, bq), ref.type, value, "s")
        return [b.function([]), body.function(returns)]


def lower_decode(op: Op, pattern: Function) -> list[Function]:
    """The tile program of a split-decode kernel op (first) and its key loop's body."""
    qk = next((o for o in pattern.ops if o.opcode == "dot"), None)
    m = match_attention(pattern, qk) if qk is not None else None
    if m is None:
        raise FusecError(f"kernel {op.attr('callee')}: its pattern is no longer an attention fusec recognises")
    return _DecodeLowering(op, pattern, m).lower()
