"""The labels attention recognition gives array dimensions, in the scores' canonical space
``[B, Tq, Tk]`` (the QK dot's batch axes flattened): ``("b", stride, size)`` (a factor of the
batch: batch index ``(b // stride) % size``), ``("q", 1, Tq)``, ``("k", 1, Tk)``, ``("d", 1, D)``
(head dim), ``("m", stride, H)`` (heads merged with a power-of-two head dim, ``[T, H * hd]``) or
``ONE`` (a size-1 axis that broadcasts); and how reshapes, transposes and broadcasts carry them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fusec.ir import Op, Value

Label = tuple[str, int, int]
Labels = tuple[Label, ...]
ONE: Label = ("1", 1, 1)


def lab(kind: str, size: int, stride: int = 1) -> Label:
    return ONE if size == 1 else (kind, stride, size)


def batch_labels(shape: tuple[int, ...]) -> Labels:
    """Row-major batch labels of batch dimensions ``shape``."""
    out: list[Label] = []
    stride = 1
    for n in reversed(shape):
        out.append(lab("b", n, stride))
        stride *= n
    return tuple(reversed(out))


def relabel_reshape(labels: Labels, out_shape: tuple[int, ...]) -> Labels | None:
    """The labels after a reshape, or None when it mixes axes of different meaning (or splits a
    run of batch axes that is not row-major contiguous)."""
    tokens: list[list[Label]] = []
    for lb in labels:
        if lb == ONE:
            continue
        last = tokens[-1][-1] if tokens else None
        if lb[0] == "b" and last is not None and last[0] == "b" and last[1] == lb[1] * lb[2]:
            tokens[-1].append(lb)
        else:
            tokens.append([lb])
    out: list[Label | None] = []
    ti, acc, pending = 0, 1, []
    for n in out_shape:
        if n == 1:
            out.append(ONE)
            continue
        if ti >= len(tokens):
            return None
        run = tokens[ti]
        if run[0][0] != "b":
            if n != run[0][2]:
                return None
            out.append(run[0])
            ti += 1
            continue
        total = math.prod(lb[2] for lb in run)
        pending.append((len(out), n))
        out.append(None)
        acc *= n
        if total % acc:
            return None
        if acc == total:
            stride = run[-1][1]
            for pos, size in reversed(pending):
                out[pos] = ("b", stride, size)
                stride *= size
            pending, acc, ti = [], 1, ti + 1
    if ti != len(tokens) or pending:
        return None
    return tuple(lb for lb in out if lb is not None)


def broadcast_source_labels(op: Op, labels: Labels) -> Labels:
    """The labels of a broadcast's operand, given its result's: size-1 dimensions broadcast."""
    src, out = op.operands[0].type.shape, op.result.type.shape
    return tuple(labels[d] if src[i] == out[d] else ONE for i, d in enumerate(op.attr("dims")))


def merge_split(roles: Labels, merged: tuple[int, ...], split: tuple[int, ...]) -> Labels | None:
    """The labels of ``merged``, a shape that joins a batch factor with the head-dim axis after
    it (``[T, H, hd] -> [T, H * hd]``), given the labels of ``split``: that axis becomes
    ``("m", stride, H)``, heads of a power-of-two size read as whole blocks."""
    if len(merged) != len(split) - 1 or any(r[0] == "m" for r in roles):
        return None
    for i in range(len(roles) - 1):
        a, b = roles[i], roles[i + 1]
        if a[0] == "b" and b[0] == "d" and not b[2] & (b[2] - 1) and \
                split[:i] + (a[2] * b[2],) + split[i + 2:] == merged:
            return roles[:i] + (("m", a[1], a[2]),) + roles[i + 2:]
    return None


def seq_kinds(roles: Labels) -> list[str]:
    """The query, key and head-dim axes an array has (a merged heads axis holds the head dim)."""
    return sorted("d" if r[0] == "m" else r[0] for r in roles if r[0] not in ("b", "1"))


@dataclass(frozen=True)
class Operand:
    """A kernel array and the label of each of its dimensions; ``offset`` is the first head (in
    whole heads) of its merged heads axis, where a slice of a fused QKV array starts."""

    value: Value
    roles: Labels
    offset: int = 0

    def dims(self, *kinds: str) -> list[int]:
        return [d for d, r in enumerate(self.roles) if r[0] in kinds]
