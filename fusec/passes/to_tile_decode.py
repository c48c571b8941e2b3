"""The tile program of a split-decode attention kernel (see :mod:`fusec.passes.decode_split`).

Program ``(b, s)`` of the grid ``(batch-heads, S)`` loads its (at most 16) query rows once, runs
the FlashAttention-2 online softmax of :mod:`fusec.passes.to_tile_attention` over the key blocks
``s * c / bk .. (s + 1) * c / bk - 1`` of its chunk (keys past the end masked to -inf, the same
score chain replayed per block), and stores the unnormalised accumulator, the row maximum and the
row sum, all f32, at ``[b, s]`` of the three partials arrays.
"""

from __future__ import annotations

from fusec.errors import FusecError
from fusec.ir import Function, KernelTiling, LowBitType, Op, TensorType, Value
from fusec.ir.types import BOOL, F32
from fusec.passes.attention_labels import Operand
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
        # K or V read packed: the view's name -> its dequantize (of a low-bit parameter).
        self.packed = {view.result.name: dq for dq in pattern.ops if dq.opcode == "dequantize"
                       for view in pattern.ops if view.opcode == "reshape" and view.operands[0] == dq.result}

    def tail_masked(self) -> bool:
        return self.s * self.c > self.m.tk

    def load_kv(self, b: TileBuilder, operand: Operand, kk: Value, dblock: int, hint: str) -> Value:
        dq = self.packed.get(operand.value.name)
        if dq is None:
            return super().load_kv(b, operand, kk, dblock, hint)
        return self.unpack_kv(b, operand, dq, kk, dblock, hint)

    def unpack_kv(self, b: TileBuilder, operand: Operand, dq: Op, kk: Value, dblock: int, hint: str) -> Value:
        """Key block ``kk`` of a K or V stored packed as ``[R, heads... x C]`` and viewed as
        ``[R, heads..., C]``: its words and group scales (and zero-points) loaded, the codes
        unpacked in registers. Keys are ``[T, heads x D]`` (a [bk, D] tile: rows of the block,
        the head's D columns), values ``[D, heads x T]`` (a [D, bk] tile: every row, the block's
        columns within the head's T)."""
        fmt = dq.operands[0].type.elem
        assert isinstance(fmt, LowBitType)
        view, roles = operand.value.type.shape, operand.roles
        rows_kind = roles[0][0]
        last = view[-1]
        if rows_kind not in ("k", "d") or roles[-1][0] not in ("k", "d") or roles[-1][0] == rows_kind or \
                (rows_kind == "d" and last % self.bk) or (rows_kind == "k" and last != dblock):
            raise FusecError(f"kernel {self.name}: {hint} is packed in a layout the decode kernel does not unpack")
        head = b.const(0)
        for d in range(1, len(view) - 1):  # the head's index among the view's middle (heads) axes
            index = self.batch_index(b, self.g[0], roles[d]) if roles[d][0] == "b" else b.const(0)
            scaled = b.value("mul", [head, b.const(view[d])], SCALAR, "h") if d > 1 else head
            head = b.value("add", [scaled, index], SCALAR, "h")
        words = self.body_parts[dq.operands[0].name]
        n_planes = len(fmt.plane_widths)
        rows = dq.result.type.shape[0]
        if rows_kind == "k":  # keys: block kk of rows, the head's column block
            row_block, col_block, tile = kk, head, (self.bk, last)
            group = fmt.rows_per_scale(rows)
            if group % self.bk:
                raise FusecError(f"kernel {self.name}: key block {self.bk} straddles {hint}'s scale groups of {group}")
            scale_row = b.value("div", [kk, b.const(group // self.bk)], SCALAR, "g") if group > self.bk else kk
        else:  # values: every row, the head's key block kk
            if fmt.rows_per_scale(rows) != rows:
                raise FusecError(f"kernel {self.name}: {hint} has more than one scale group per token")
            steps = b.value("mul", [head, b.const(last // self.bk)], SCALAR, "h")
            row_block, col_block, tile = b.const(0), b.value("add", [steps, kk], SCALAR, "col"), (rows, self.bk)
            scale_row = b.const(0)
        tiles = []
        for j, p in enumerate(fmt.plane_widths):
            ref = words[j]
            loaded = b.access("load", ref, [row_block, col_block], (tile[0] * p // 32, tile[1]), ref.type,
                              hint=f"{hint}w{j}")
            assert loaded is not None
            tiles.append(loaded)
        for ref in words[n_planes:]:
            loaded = b.access("load", ref, [scale_row, col_block], (1, tile[1]), ref.type, hint=f"{hint}s")
            assert loaded is not None
            tiles.append(loaded)
        attrs = {"format": str(fmt), "shape": tile, "dtype": str(dq.result.type.elem)}
        if dq.attr("lut") is not None:
            attrs["lut"] = dq.attr("lut")
        return b.value("unpack", tiles, TensorType(dq.result.type.elem, tile), hint, **attrs)

    def lower(self) -> list[Function]:
        m, t, bq = self.m, self.t, self.bq
        b = TileBuilder(f"{self.name}.tile", t)
        refs: dict[str, Value] = {}
        parts: dict[str, list[Value]] = {}  # a low-bit parameter's arrays: planes, scales, zero-points
        for i, p in enumerate(self.callee.params):
            if isinstance(p.type.elem, LowBitType):
                parts[p.name] = [b.param(f"in{i}_{j}", t) for j, t in enumerate(p.type.elem.part_types(p.type.shape))]
            else:
                refs[p.name] = b.param(f"in{i}", p.type)
        outs = [b.param(f"out{j}", r.type) for j, r in enumerate(self.op.results)]
        g0, gs = b.program_id(0), b.program_id(1)
        zero = b.const(0)
        q_tile = self.access(b, "load", refs[m.q.value.name], m.q.roles, {"q": (zero, bq), "d": (zero, self.dp)}, g0,
                             hint="q", offset=m.q.offset)
        assert q_tile is not None
        dvp = t.block[2]
        acc_type, row = TensorType(F32, (bq, dvp)), TensorType(F32, (bq,))
        inits = [b.const(float("-inf"), row), b.const(0.0, row), b.const(0.0, acc_type)]
        captured = [*refs.values(), *(r for rs in parts.values() for r in rs), g0, gs, q_tile]
        body = TileBuilder(f"{self.name}.tile.kv", t)
        kk = body.param("kk", SCALAR)
        body.scalars.intervals[kk.name] = (0, self.per - 1)
        carried = [body.param(hint, v.type) for hint, v in zip(("m", "l", "acc"), inits)]
        inner = body.capture(b, captured)
        self.body_refs = {name: inner[r.name] for name, r in refs.items()}
        self.body_parts = {name: [inner[r.name] for r in rs] for name, rs in parts.items()}
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


def lower_combine(op: Op, callee: Function) -> list[Function]:
    """The combine's tile program: program ``b`` loads the S partials of its batch-head (chunk
    rows past S read ``m = -inf``, adding nothing) and writes ``sum_s w_s O_s / sum_s w_s l_s``."""
    t = KernelTiling.from_attrs(op.attr_dict)
    o_type, m_type, _ = (v.type for v in op.operands)
    _, s, tq, dv = o_type.shape
    sp, bq, dvp = pow2_at_least(s), t.block[1], t.block[2]
    b = TileBuilder(f"{callee.name}.tile", t)
    o_ref, m_ref, l_ref = (b.param(f"in{i}", v.type) for i, v in enumerate(op.operands))
    out = b.param("out0", op.results[0].type)
    g0, zero = b.program_id(0), b.const(0)
    parts = TensorType(F32, (sp, bq))
    m = b.access("load", m_ref, [g0, zero, zero], (None, sp, bq), m_type, hint="m", other=float("-inf"))
    l_ = b.access("load", l_ref, [g0, zero, zero], (None, sp, bq), m_type, hint="l")
    o = b.access("load", o_ref, [g0, zero, zero, zero], (None, sp, bq, dvp), o_type, hint="o")
    assert m is not None and l_ is not None and o is not None
    row = TensorType(F32, (bq,))
    top = b.value("reduce", [m], row, "top", axes=(0,), kind="max")
    dead = b.value("eq", [top, b.const(float("-inf"), row)], row.with_elem(BOOL), "dead")
    top = b.value("select", [dead, top, b.const(0.0, row)], row, "top")
    w = b.value("exp", [b.value("sub", [m, b.value("broadcast", [top], parts, "tb", dims=(1,), shape=parts.shape)],
                                parts, "d")], parts, "w")
    total = b.value("reduce", [b.value("mul", [w, l_], parts, "wl")], row, "total", axes=(0,), kind="sum")
    cube = TensorType(F32, (sp, bq, dvp))
    wb = b.value("broadcast", [w], cube, "wb", dims=(0, 1), shape=cube.shape)
    acc = TensorType(F32, (bq, dvp))
    summed = b.value("reduce", [b.value("mul", [o, wb], cube, "wo")], acc, "acc", axes=(0,), kind="sum")
    value = b.value("div", [summed, b.value("broadcast", [total], acc, "tb", dims=(0,), shape=acc.shape)], acc, "o")
    elem = out.type.elem
    if elem != F32:
        value = b.value("convert", [value], acc.with_elem(elem), "o", dtype=str(elem))
    b.access("store", out, [g0, zero, zero], (None, bq, dvp), out.type, value, "o")
    return [b.function([])]
