"""Sinking row reshapes: elementwise work on ``reshape([M, N] -> [a, b, N])`` runs on the [M, N]
rows instead, and the reshape moves after it.

A matmul over an input with leading batch axes (``x @ w`` with x [batch, seq, d], as Linen's Dense
does) is a 2-D ``dot`` between two reshapes; its bias, activation and residual then work in the
3-D space, so fusion could not give them to the matmul as an epilogue. After this pass they work on
the dot's [M, N] result directly. The other operands follow: splat constants and bias broadcasts
are rebuilt at [M, N], anything else is reshaped (a free, row-major merge of leading axes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from fusec.ir import Function, Module, Op, TensorType, Value
from fusec.ir.opdefs import OPDEFS
from fusec.passes.base import Pass, register_pass

ELEMENTWISE = frozenset(name for name, d in OPDEFS.items() if d.kind == "elementwise")


def _row_source(v: Value, producers: dict[str, Op]) -> Value | None:
    """The [M, N] value ``v`` reshapes, when ``v`` is [.., N] with its leading axes merging into M."""
    op = producers.get(v.name)
    if op is None or op.opcode != "reshape" or v.type.rank < 3:
        return None
    src = op.operands[0]
    shape, rows = v.type.shape, src.type.shape
    if len(rows) == 2 and rows[1] == shape[-1] and rows[0] == math.prod(shape[:-1]):
        return src
    return None


class _Sinker:
    def __init__(self, func: Function) -> None:
        self.taken = {p.name for p in func.params} | {r.name for op in func.ops for r in op.results}
        self.producers: dict[str, Op] = {}
        self.ops: list[Op] = []
        self.rows: dict[str, Value] = {}  # value name -> its [M, N] form

    def fresh(self, base: str, type_: TensorType) -> Value:
        name, n = f"{base}.rows", 0
        while name in self.taken:
            n += 1
            name = f"{base}.rows{n}"
        self.taken.add(name)
        return Value(name, type_)

    def emit(self, op: Op) -> None:
        self.ops.append(op)
        self.producers.update({r.name: op for r in op.results})

    def to_rows(self, v: Value, rows: tuple[int, ...], loc: str) -> Value:
        if v.name in self.rows:
            return self.rows[v.name]
        target = TensorType(v.type.elem, rows)
        op = self.producers.get(v.name)
        src = _row_source(v, self.producers)
        if src is not None:
            out = src
        elif op is not None and op.opcode == "constant" and not isinstance(op.attr("value"), tuple):
            out = self.fresh(v.name, target)
            self.emit(replace(Op.make("constant", (), (out,), **(op.attr_dict | {"shape": rows})), loc=op.loc))
        elif op is not None and op.opcode == "broadcast" and len(rows) == 2 and self._row_broadcastable(op):
            # Only onto [M, N]: the row form of a reduction's result is [M], and a broadcast to
            # [a, b] along its last axis is no broadcast along that flattened axis (a reshape is).
            out = self._broadcast_rows(op, target, loc)
        else:
            out = self.fresh(v.name, target)
            self.emit(replace(Op.make("reshape", (v,), (out,), shape=rows), loc=loc))
        self.rows[v.name] = out
        return out

    @staticmethod
    def _row_broadcastable(op: Op) -> bool:
        src, rank = op.operands[0], op.result.type.rank
        dims = tuple(op.attr("dims"))
        if src.type.rank == 0 or dims == (rank - 1,):
            return True
        return dims == tuple(range(rank)) and all(d == 1 for d in src.type.shape[:-1])

    def _broadcast_rows(self, op: Op, target: TensorType, loc: str) -> Value:
        """A scalar or a row vector broadcast straight to [M, N]."""
        src = op.operands[0]
        out = self.fresh(op.result.name, target)
        if src.type.rank == 0:
            dims: tuple[int, ...] = ()
        elif src.type.rank == 1:
            dims = (1,)
        else:  # [1, .., 1, N] -> [1, N]
            row = self.fresh(src.name, TensorType(src.type.elem, (1, src.type.shape[-1])))
            self.emit(replace(Op.make("reshape", (src,), (row,), shape=row.type.shape), loc=loc))
            src, dims = row, (0, 1)
        self.emit(replace(Op.make("broadcast", (src,), (out,), shape=target.shape, dims=dims), loc=op.loc))
        return out

    def row_form(self, v: Value) -> Value | None:
        return self.rows.get(v.name) or _row_source(v, self.producers)

    def visit(self, op: Op) -> None:
        out = op.results[0] if len(op.results) == 1 else None
        forms = [f for v in op.operands if (f := self.row_form(v)) is not None]
        if out is None or not forms:
            self.emit(op)
        elif op.opcode in ELEMENTWISE and all(v.type.shape == out.type.shape for v in op.operands):
            rows = forms[0].type.shape
            operands = tuple(self.to_rows(v, rows, op.loc) for v in op.operands)
            self._emit_rows(op, operands, TensorType(out.type.elem, rows), op.attr_dict)
        elif op.opcode == "reduce" and tuple(op.attr("axes")) == (out.type.rank,) and forms[0].type.rank == 2:
            # A reduction over the last axis: per row of [M, N], giving [M].
            src = forms[0]
            self._emit_rows(op, (src,), TensorType(out.type.elem, src.type.shape[:1]), op.attr_dict | {"axes": (1,)})
        elif op.opcode == "broadcast" and self._expands_last_axis(op, forms[0]):
            # [a, b] -> [a, b, n] (or [a, b, 1] -> [a, b, n]): row values spread along the last axis.
            src = forms[0]
            rows = (src.type.shape[0], out.type.shape[-1])
            attrs = op.attr_dict | {"shape": rows, "dims": tuple(range(src.type.rank))}
            self._emit_rows(op, (src,), TensorType(out.type.elem, rows), attrs)
        else:
            self.emit(op)

    @staticmethod
    def _expands_last_axis(op: Op, form: Value) -> bool:
        src, out = op.operands[0], op.result
        if out.type.rank < 2 or math.prod(out.type.shape[:-1]) != form.type.shape[0]:
            return False
        dims = tuple(op.attr("dims"))
        return dims == tuple(range(src.type.rank)) and src.type.shape[:out.type.rank - 1] == out.type.shape[:-1]

    def _emit_rows(self, op: Op, operands: tuple[Value, ...], type_: TensorType, attrs: Mapping[str, Any]) -> None:
        """``op`` on row forms, then a reshape back to its result's shape under its result's name."""
        out = op.results[0]
        flat = self.fresh(out.name, type_)
        made = Op.make(op.opcode, operands, (flat,), **attrs)
        self.emit(replace(made, loc=op.loc))
        self.emit(replace(Op.make("reshape", (flat,), (out,), shape=out.type.shape), loc=op.loc))
        self.rows[out.name] = flat


def sink_reshapes(func: Function) -> Function:
    sinker = _Sinker(func)
    for op in func.ops:
        sinker.visit(op)
    return Function(func.name, func.params, tuple(sinker.ops), func.returns)


@register_pass
@dataclass(frozen=True)
class SinkReshapes(Pass):
    name = "sink-reshapes"

    def run(self, module: Module) -> Module:
        return module.replace_functions([sink_reshapes(f) for f in module.functions])

