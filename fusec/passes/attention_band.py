"""The band of keys a causal or sliding-window attention lets each query see, for block skipping.

When the score chain's last value-changing op is ``select(cond, fill, scores)`` with ``cond`` built
from iotas alone (comparisons of ``iota_q + c`` with ``iota_k + c'``, ``and``, bool selects and
broadcasts: ``tril``, ``jnp.where(j <= i, ...)``, windows), the allowed keys of query ``i`` are
``lo <= j - i <= hi``. A key block outside the band is all ``fill``, and skipping it changes nothing
when ``fill`` is -inf, or, with no bias or padding mask, a fill so low (<= -1e9) that ``exp(fill -
max)`` is 0 beside the row's own scores, and every query sees at least one key (else the reference
spreads a fully masked row over every key; with -inf such a row is NaN either way)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fusec.ir import Function, Value
from fusec.passes.attention_labels import Labels, broadcast_source_labels
from fusec.passes.attention_match import AttentionMatch

_INF = math.inf
_LAYOUT = ("reshape", "transpose", "convert", "stop_gradient")
# cmp(a, b) with a = x + ca, b = y + cb: the constraint on j - i it sets (see _compare).
_FLIP = {"ge": "le", "gt": "lt", "le": "ge", "lt": "gt"}


@dataclass(frozen=True)
class Band:
    """Query ``i`` sees keys ``j`` with ``lo <= j - i <= hi`` (``lo``/``hi`` may be infinite)."""

    lo: float
    hi: float

    def key_range(self, q0: int, q1: int, tk: int) -> tuple[int, int]:
        """The keys ``[first, last + 1)`` some query in ``q0 .. q1 - 1`` sees (clipped to ``[0, tk)``)."""
        first = 0 if self.lo == -_INF else max(0, q0 + int(self.lo))
        last = tk - 1 if self.hi == _INF else min(tk - 1, q1 - 1 + int(self.hi))
        return first, max(first, last + 1)

    def block_range(self, qb: int, bq: int, bk: int, tk: int) -> tuple[int, int]:
        """Key blocks ``[start, stop)`` query block ``qb`` visits (what the kernel's loop computes)."""
        first, end = self.key_range(qb * bq, qb * bq + bq, tk)
        return first // bk, -(-end // bk)


class _BandFinder:
    def __init__(self, func: Function, m: AttentionMatch) -> None:
        self.producer = {r.name: o for o in func.ops for r in o.results}
        self.m = m

    def axis_term(self, v: Value, labels: Labels) -> tuple[str, int] | None:
        """``v`` as ``axis + c`` (axis "q", "k" or "" for a constant)."""
        op = self.producer.get(v.name)
        if op is None:
            return None
        if op.opcode == "constant" and isinstance(op.attr("value"), int) and not isinstance(op.attr("value"), bool):
            return ("", int(op.attr("value")))
        if op.opcode == "iota":
            axis = labels[int(op.attr("dimension"))][0]
            return (axis, 0) if axis in ("q", "k") else None
        if op.opcode == "broadcast":
            return self.axis_term(op.operands[0], broadcast_source_labels(op, labels))
        if op.opcode in ("add", "sub"):
            a, b = (self.axis_term(u, labels if u.type.shape else ()) for u in op.operands)
            if a is None or b is None or (a[0] and b[0]) or (op.opcode == "sub" and b[0]):
                return None
            c = a[1] + b[1] if op.opcode == "add" else a[1] - b[1]
            return (a[0] or b[0], c)
        return None

    def cond(self, v: Value, labels: Labels) -> Band | None:
        """The band where bool ``v`` is true (None when it is not such a band)."""
        op = self.producer.get(v.name)
        if op is None:
            return None
        if op.opcode == "constant" and op.attr("value") is True:
            return Band(-_INF, _INF)
        if op.opcode == "broadcast":
            return self.cond(op.operands[0], broadcast_source_labels(op, labels))
        if op.opcode == "and":
            a, b = (self.cond(u, labels) for u in op.operands)
            return None if a is None or b is None else Band(max(a.lo, b.lo), min(a.hi, b.hi))
        if op.opcode == "select":  # select(c, x, y) = where(c, y, x): where(c, True, False) is c
            consts = [self.producer.get(u.name) for u in op.operands[1:]]
            if all(c is not None and c.opcode == "constant" for c in consts) and \
                    [c.attr("value") for c in consts] == [False, True]:  # type: ignore[union-attr]
                return self.cond(op.operands[0], labels)
            return None
        if op.opcode in _FLIP:
            a, b = (self.axis_term(u, labels) for u in op.operands)
            if a is None or b is None:
                return None
            return _compare(op.opcode, a, b)
        return None


def _compare(cmp: str, a: tuple[str, int], b: tuple[str, int]) -> Band | None:
    """The band of ``cmp(a, b)``, terms ``axis + c``, one over queries and one over keys."""
    if {a[0], b[0]} != {"q", "k"}:
        return None
    if a[0] == "q":  # make it k-side cmp q-side
        cmp, a, b = _FLIP[cmp], b, a
    # j + ca  cmp  i + cb   <=>   j - i  cmp  cb - ca
    d = b[1] - a[1]
    if cmp == "le":
        return Band(-_INF, d)
    if cmp == "lt":
        return Band(-_INF, d - 1)
    if cmp == "ge":
        return Band(d, _INF)
    return Band(d + 1, _INF)


def attention_band(func: Function, m: AttentionMatch) -> Band | None:
    """The band the kernel may skip outside of, or None (no skipping: see the module doc)."""
    chain = [op for op in m.chain if op.opcode not in _LAYOUT]
    if not chain or chain[-1].opcode != "select":
        return None
    sel = chain[-1]
    labels = m.labels[sel.result.name]
    pred, fill, score = sel.operands
    finder = _BandFinder(func, m)
    fill_op = finder.producer.get(fill.name)
    if score.name not in m.labels or fill.name in m.labels or fill_op is None or fill_op.opcode != "constant":
        return None
    value = fill_op.attr("value")
    if not isinstance(value, float) or not (value == -_INF or (value <= -1e9 and not m.inputs)):
        return None
    band = finder.cond(pred, labels)
    if band is None or (band.lo == -_INF and band.hi == _INF):
        return None
    # With a finite fill every query must see a key: i + hi >= 0 at i = 0, i + lo <= tk - 1 at
    # i = tq - 1, lo <= hi (a -inf row is NaN with or without the blocks skipped).
    if value != -_INF and (band.hi < 0 or m.tq - 1 + band.lo > m.tk - 1 or band.lo > band.hi):
        return None
    return band


def visited_blocks(band: Band | None, tq: int, tk: int, bq: int, bk: int) -> int:
    """How many (query block, key block) pairs the kernel computes."""
    nq, nk = -(-tq // bq), -(-tk // bk)
    if band is None:
        return nq * nk
    return sum(max(0, stop - start) for start, stop in (band.block_range(qb, bq, bk, tk) for qb in range(nq)))
