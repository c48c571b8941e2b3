"""``split-decode``: flash-decoding for attention kernels with few queries and many keys.

A decode step (``Tq`` 1..16) over a long KV cache gives the FlashAttention-2 kernel one program
per batch-head: 32 programs at batch 1, 32 heads, on a GPU with 132 SMs. This pass splits the key
axis into ``S`` chunks of ``c`` keys (``c`` a multiple of 128, so every target's key block divides
it): the attention kernel becomes a *partials* kernel over the grid ``(batch-heads, S)`` whose
program ``(b, s)`` writes, in f32, the unnormalised output ``O_s = sum_k exp(x - m_s) V`` of its
chunk, the chunk's row maximum ``m_s`` and sum ``l_s``; a small combine (ordinary graph ops, which
``fuse`` makes a kernel of its own) merges them: ``M = max_s m_s``, ``w_s = exp(m_s - M)``,
``O = sum_s w_s O_s / sum_s w_s l_s``. A chunk with no finite score has ``m_s = -inf`` and adds
nothing; a row with none at all gives 0/0 = NaN, as softmax does.

The partials kernel's callee is the partials written as graph ops (its reference, for ``jax.grad``
and the XLA backend); the attention it came from stays in the module as ``<callee>.pattern`` (its
``pattern`` attribute), which ``to-tile`` reads the tile program from. ``c`` is fixed here, not by
the target, so interpreter and GPU kernels compute the same partials as the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fusec.ir import Function, KernelTiling, LowBitType, Module, Op, Value, infer_result_types
from fusec.ir.tiling import cdiv
from fusec.ir.types import F32
from fusec.passes.attention_labels import ONE, Labels
from fusec.passes.attention_match import AttentionMatch, match_attention
from fusec.passes.base import Pass, register_pass
from fusec.passes.cost import nbytes
from fusec.passes.rewrite import fresh_name

MAX_QUERIES = 16  # query rows (per head) the decode kernel holds in one tile
MIN_PROGRAMS = 256  # about two programs per SM on a 132-SM H100/H200
CHUNK_QUANTUM = 128  # every target's key block divides a chunk
MAX_BATCH = 128  # batch-heads that fill the GPU without a split


def decode_chunks(batch: int, tk: int) -> tuple[int, int]:
    """``(S, c)``: ``S`` chunks of ``c`` keys (the last may overhang ``tk``), with ``batch * S``
    at least :data:`MIN_PROGRAMS` where ``tk`` allows; ``S == 1`` means no split."""
    blocks = -(-tk // CHUNK_QUANTUM)
    want = min(blocks, -(-MIN_PROGRAMS // max(1, batch)))
    per = -(-blocks // max(1, want))
    c = per * CHUNK_QUANTUM
    return -(-tk // c), c


def splittable(m: AttentionMatch) -> str:
    """Why ``m`` is not split ("" when it is): the shapes, and a layout the partials' reference
    can be written in (scores [B..., Tq, Tk] in the QK dot's order, P @ V with P as the lhs)."""
    if m.tq > MAX_QUERIES or m.batch > MAX_BATCH:
        return f"Tq = {m.tq}, batch-heads = {m.batch}: the forward kernel's grid is full enough"
    if decode_chunks(m.batch, m.tk)[0] < 2:
        return f"{m.tk} keys make one chunk"
    canonical = _batch_order(m.labels[m.qk.result.name])
    if not canonical[0] or _batch_order(m.labels[m.x.name]) != canonical or m.x.type.shape[-2:] != (m.tq, m.tk):
        return "the score chain changes the scores' layout"
    p = m.pv.operands[0]
    if _batch_order(m.labels.get(p.name, ())) != canonical or m.pv.attr("lhs_t") or p.type.shape[-2:] != (m.tq, m.tk):
        return "the probabilities are not P V's lhs in the scores' layout"
    return ""


def _batch_order(labels: Labels) -> tuple[bool, Labels]:
    """Whether the labels' batch axes flatten row-major to the batch index (size-1 axes left
    out), and their last two, which must be the query and key axes: what makes a reshape between
    two such layouts free."""
    if len(labels) < 2 or labels[-1][0] != "k":
        return False, ()
    stride = 1
    for lb in reversed([lb for lb in labels[:-2] if lb != ONE]):
        if lb[0] != "b" or lb[1] != stride:
            return False, ()
        stride *= lb[2]
    return True, labels[-2:]


def decode_tiling(space: tuple[int, ...], chunk: int, target: str) -> KernelTiling:
    """Grid ``(batch-heads, S, 1)`` over the space ``(batch-heads, S, Dv)``; key blocks of 32 for
    the interpreter (several online-softmax steps even in small tests), 64 on a GPU."""
    batch, s, dv = space
    bk = min(32 if target == "interpret" else 64, chunk)
    block = (1, 1, 1 << max(0, dv - 1).bit_length())
    return KernelTiling("attention", tuple(space), block, tuple(cdiv(n, b) for n, b in zip(space, block)), (0, 1), bk,
                        strategy="decode")


def combine_tiling(space: tuple[int, ...]) -> KernelTiling:
    """One program per batch-head over the combine's space ``(batch-heads, Tq, Dv)``."""
    batch, tq, dv = space
    block = (1, 1 << max(0, tq - 1).bit_length(), 1 << max(0, dv - 1).bit_length())
    return KernelTiling("decode-combine", tuple(space), block, tuple(cdiv(n, b) for n, b in zip(space, block)), (0,))


class _Emitter:
    """Appends ops with fresh names (none of ``taken``) and inferred result types."""

    def __init__(self, taken: set[str], prefix: str) -> None:
        self.taken, self.prefix = taken, prefix
        self.ops: list[Op] = []

    def __call__(self, opcode: str, operands: list[Value], out: Value | None = None, **attrs: Any) -> Value:
        probe = Op.make(opcode, operands, (), **attrs)
        if out is None:
            (t,) = infer_result_types(opcode, [v.type for v in operands], probe.attr_dict)
            out = Value(fresh_name(self.prefix, self.taken), t)
        self.ops.append(Op(opcode, tuple(operands), (out,), probe.attrs))
        return out

    def const(self, value: float, shape: tuple[int, ...], dtype: str = "f32") -> Value:
        return self("constant", [], value=value, dtype=dtype, shape=shape)

    def safe_max(self, mx: Value) -> Value:
        """``mx`` with -inf replaced by 0 (subtracting -inf would make NaN of -inf - -inf)."""
        dead = self("eq", [mx, self.const(float("-inf"), mx.type.shape)])
        return self("select", [dead, mx, self.const(0.0, mx.type.shape)])


def partials_callee(m: AttentionMatch, callee: Function, name: str, s: int, c: int) -> Function:
    """The reference of the partials kernel: the pattern's ops up to the scores (the chain cloned
    under fresh names), then ``(O_s, m_s, l_s)`` per chunk as ``f32[B, S, Tq, Dv]``, ``[B, S, Tq]``."""
    callee_ops = callee.ops
    taken = {v.name for op in callee.ops for v in (*op.operands, *op.results)} | {p.name for p in callee.params}
    e = _Emitter(taken, "dec")
    # The ops up to the scores: the pattern's, less the softmax and what follows it (the chain's
    # side operands: masks, iotas, constants, are kept where they are made).
    chain = {id(op) for op in m.chain} | {id(m.qk)}
    later = {m.x.name}
    for op in callee_ops:
        if id(op) not in chain and any(v.name in later for v in op.operands):
            later.update(r.name for r in op.results)
        else:
            e.ops.append(op)
    bs, tq, tk = m.x.type.shape[:-2], m.tq, m.tk
    r = len(bs)
    x = m.x
    if x.type.elem != F32:
        x = e("convert", [x], dtype="f32")
    v, rhs_t = m.pv.operands[1], bool(m.pv.attr("rhs_t"))
    if v.type.shape[:-2] != bs:  # P V's batch axes, in the scores' layout (the same row-major order)
        v = e("reshape", [v], shape=(*bs, *v.type.shape[-2:]))
    pad = s * c - tk
    if pad:  # keys past the end: -inf scores, zero values
        x = e("concatenate", [x, e.const(float("-inf"), (*bs, tq, pad))], axis=r + 1)
        v_pad = (*bs, pad, v.type.shape[-1]) if not rhs_t else (*bs, v.type.shape[-2], pad)
        v = e("concatenate", [v, e.const(0.0, v_pad, str(v.type.elem))], axis=r + 1 if rhs_t else r)
    xr = e("reshape", [x], shape=(*bs, tq, s, c))
    mx = e("reduce", [xr], kind="max", axes=(r + 2,))
    ms = e("broadcast", [e.safe_max(mx)], shape=xr.type.shape, dims=tuple(range(r + 2)))
    p = e("exp", [e("sub", [xr, ms])])
    ls = e("reduce", [p], kind="sum", axes=(r + 2,))
    swap = (*range(r), r + 1, r, r + 2)
    pt = e("transpose", [p], perm=swap)  # [B..., S, Tq, c]
    if v.type.elem != F32:
        pt = e("convert", [pt], dtype=str(v.type.elem))
    if rhs_t:  # [B..., Dv, S c] -> [B..., S, Dv, c]
        vr = e("transpose", [e("reshape", [v], shape=(*bs, v.type.shape[-2], s, c))], perm=swap)
    else:  # [B..., S c, Dv] -> [B..., S, c, Dv]
        vr = e("reshape", [v], shape=(*bs, s, c, v.type.shape[-1]))
    precision = {k: m.pv.attr(k) for k in ("precision", "precision_pair", "algorithm") if m.pv.attr(k) is not None}
    o = e("dot", [pt, vr], lhs_t=False, rhs_t=rhs_t, out_dtype="f32", **precision)
    dv = o.type.shape[-1]
    back = (*range(r), r + 1, r)
    outs = [e("reshape", [o], shape=(m.batch, s, tq, dv)),
            e("reshape", [e("transpose", [mx], perm=back)], shape=(m.batch, s, tq)),
            e("reshape", [e("transpose", [ls], perm=back)], shape=(m.batch, s, tq))]
    return Function(name, callee.params, tuple(e.ops), tuple(outs))


def combine(e: _Emitter, o: Value, mx: Value, ls: Value) -> Value:
    """``sum_s w_s O_s / sum_s w_s l_s`` with ``w_s = exp(m_s - max_s m_s)``: f32[B, Tq, Dv]."""
    b, s, tq, dv = o.type.shape
    top = e.safe_max(e("reduce", [mx], kind="max", axes=(1,)))
    w = e("exp", [e("sub", [mx, e("broadcast", [top], shape=(b, s, tq), dims=(0, 2))])])
    total = e("reduce", [e("mul", [w, ls])], kind="sum", axes=(1,))
    wo = e("mul", [o, e("broadcast", [w], shape=o.type.shape, dims=(0, 1, 2))])
    acc = e("reduce", [wo], kind="sum", axes=(1,))
    return e("div", [acc, e("broadcast", [total], shape=(b, tq, dv), dims=(0, 1))])


def packed_view(v: Value, producers: dict[str, Op]) -> tuple[Op, Op] | None:
    """``(dequantize, reshape)`` when ``v`` is a low-bit array dequantized and viewed as
    ``[R, heads..., C]`` (its packed axis first): a KV cache's keys or values."""
    view = producers.get(v.name)
    dq = producers.get(view.operands[0].name) if view is not None and view.opcode == "reshape" else None
    if dq is None or dq.opcode != "dequantize" or len(dq.operands) != 1 or \
            not isinstance(dq.operands[0].type.elem, LowBitType):
        return None
    rows, shape = dq.result.type.shape[0], v.type.shape
    if len(shape) < 3 or shape[0] != rows:
        return None
    return dq, view


def absorb_packed(op: Op, callee: Function, m: AttentionMatch, producers: dict[str, Op]) -> tuple[Op, Function]:
    """The kernel op and its callee reading K and V packed where they are dequantized views of
    low-bit arrays: the kernel takes the low-bit array, and its callee starts with the dequantize
    and the view (so the kernel unpacks the codes in registers and reads only codes and scales)."""
    operands, params, prologue = list(op.operands), list(callee.params), []
    taken = {v.name for o in callee.ops for v in (*o.operands, *o.results)} | {p.name for p in params}
    for target in (m.k.value, m.v.value):
        if target.name not in {p.name for p in params}:
            continue
        i = [p.name for p in params].index(target.name)
        found = packed_view(operands[i], producers)
        if found is None:
            continue
        dq, view = found
        packed = Value(fresh_name(f"{target.name}.packed", taken), dq.operands[0].type)
        values = Value(fresh_name(f"{target.name}.dq", taken), dq.result.type)
        prologue += [Op(dq.opcode, (packed,), (values,), dq.attrs, dq.loc),
                     Op(view.opcode, (values,), (target,), view.attrs, view.loc)]
        operands[i], params[i] = dq.operands[0], packed
    if not prologue:
        return op, callee
    new_op = Op(op.opcode, tuple(operands), op.results, Op.make(
        "kernel", **(op.attr_dict | {"bytes_read": sum(nbytes(v.type) for v in operands)})).attrs, op.loc)
    return new_op, Function(callee.name, tuple(params), (*prologue, *callee.ops), callee.returns)


def split_kernel(op: Op, callee: Function, names: set[str], taken: set[str], producers: dict[str, Op]
                 ) -> tuple[list[Op], list[Function]] | None:
    """The partials kernel and the combine replacing attention kernel ``op``, and the functions
    they add (the partials' reference and the pattern); None when it is not split."""
    qk = next((o for o in callee.ops if o.opcode == "dot"), None)
    m = match_attention(callee, qk) if qk is not None else None
    if m is None or splittable(m):
        return None
    op, callee = absorb_packed(op, callee, m, producers)
    m = match_attention(callee, next(o for o in callee.ops if o.opcode == "dot"))
    if m is None:
        return None
    s, c = decode_chunks(m.batch, m.tk)
    name = fresh_name(f"{callee.name}.decode", names)
    partials = partials_callee(m, callee, name, s, c)
    pattern = Function(f"{name}.pattern", callee.params, callee.ops, callee.returns)
    names.add(pattern.name)
    e = _Emitter(taken, f"{callee.name}.comb")
    results = [Value(fresh_name(f"{callee.name}.part", taken), r.type) for r in partials.returns]
    inner = _Emitter(set(), "c")
    parts = [Value(f"p{j}", r.type) for j, r in enumerate(results)]
    flops = 2 * m.batch * m.tq * s * c * (m.head_dim + m.value_dim)
    attrs = {k: v for k, v in op.attr_dict.items() if k not in ("callee", "space", "bytes_written", "flops")}
    kernel = Op(op.opcode, op.operands, tuple(results), Op.make(
        "kernel", **attrs, callee=name, space=(m.batch, s, m.value_dim), decode_split=s, decode_chunk=c,
        pattern=pattern.name, bytes_written=sum(nbytes(v.type) for v in results), flops=flops).attrs, op.loc)
    out = combine(inner, *parts)
    pv = m.pv.result
    if out.type.elem != pv.type.elem:
        out = inner("convert", [out], dtype=str(pv.type.elem))
    # The combine: one kernel of its own (fuse would make several of its reductions), its ops the
    # reference.
    merged = Function(fresh_name(f"{name}.combine", names), tuple(parts), tuple(inner.ops), (out,))
    out = Value(fresh_name(f"{callee.name}.o", taken), out.type)
    e.ops.append(Op.make("kernel", results, [out], callee=merged.name, kind="decode-combine",
                         space=out.type.shape, bytes_read=sum(nbytes(v.type) for v in results),
                         bytes_written=nbytes(out.type), flops=3 * math.prod(results[0].type.shape)))
    final = op.results[0]
    steps: list[tuple[str, dict[str, Any]]] = [("reshape", {"shape": pv.type.shape})]
    steps += [(t.opcode, t.attr_dict) for t in m.tail]
    for n, (opcode, attrs_) in enumerate(steps):
        out = e(opcode, [out], final if n == len(steps) - 1 else None, **attrs_)
    return [kernel, *e.ops], [partials, pattern, merged]


@register_pass
@dataclass(frozen=True)
class SplitDecode(Pass):
    """Splits the key axis of decode-shaped attention kernels over programs (flash-decoding)."""

    name = "split-decode"

    def run(self, module: Module) -> Module:
        names = {f.name for f in module.functions}
        out, added = [], []
        for func in module.functions:
            taken = {v.name for op in func.ops for v in (*op.operands, *op.results)} | {p.name for p in func.params}
            ops: list[Op] = []
            producers = {r.name: op for op in func.ops for r in op.results}
            for op in func.ops:
                found = None
                if op.opcode == "kernel" and op.attr("kind") == "attention" and op.attr("decode_split") is None:
                    found = split_kernel(op, module.function(str(op.attr("callee"))), names, taken, producers)
                if found is None:
                    ops.append(op)
                    continue
                ops += found[0]
                added += found[1]
            out.append(Function(func.name, func.params, tuple(ops), func.returns))
        return module.replace_functions(out + added)
