"""Moving quantized matrices' input transforms onto the other matmul operand.

A quantized matrix with an input transform reaches the program as ``input_transform(D)`` (side
"weight": W = T . D along its contracted axis, D the ``dequantize``d codes). A ``dot`` reading W
(through transposes and dtype conversions) contracting that axis becomes a ``dot`` reading D, with
its other operand x replaced by ``input_transform(x)`` (side "input": x T along x's contracted
axis), since x W = (x T) D. The low-bit kernel then unpacks D as usual and T costs work on x
only (a multiply, a reshape and a [b, b] matmul). W itself is left for DCE when nothing else
reads it; what does still reads the exact W (the XLA backend computes T . D there).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fusec.ir import Function, Module, Op, Value
from fusec.passes.base import Pass, register_pass

_THROUGH = ("transpose", "convert")


def _contracted_axis(dot: Op, side: int) -> int:
    """The contracted axis of ``dot``'s operand ``side`` (0 lhs, 1 rhs), canonical layout."""
    rank = dot.operands[side].type.rank
    stored_t = bool(dot.attr("lhs_t" if side == 0 else "rhs_t"))
    if side == 0:
        return rank - 2 if stored_t else rank - 1
    return rank - 1 if stored_t else rank - 2


def _weight_chain(v: Value, axis: int, producers: dict[str, Op]) -> tuple[Op, list[Op]] | None:
    """The weight-side ``input_transform`` ``v`` is read from (through transposes and converts,
    the chain in program order) when ``axis`` of ``v`` is the transform's own axis."""
    chain: list[Op] = []
    op = producers.get(v.name)
    while op is not None and op.opcode in _THROUGH:
        chain.append(op)
        if op.opcode == "transpose":
            axis = tuple(op.attr("perm"))[axis]
        op = producers.get(op.operands[0].name)
    if op is None or op.opcode != "input_transform" or op.attr("side") != "weight" or op.attr("axis") != axis:
        return None
    return op, chain[::-1]


class _Folder:
    def __init__(self, func: Function) -> None:
        self.taken = {p.name for p in func.params} | {r.name for op in func.ops for r in op.results}
        self.producers = {r.name: op for op in func.ops for r in op.results}
        self.ops: list[Op] = []

    def fresh(self, base: str, like: Value) -> Value:
        name, n = f"{base}.t", 0
        while name in self.taken:
            n += 1
            name = f"{base}.t{n}"
        self.taken.add(name)
        return Value(name, like.type)

    def fold(self, dot: Op) -> Op:
        for side in (1, 0):
            found = _weight_chain(dot.operands[side], _contracted_axis(dot, side), self.producers)
            if found is None:
                continue
            transform, chain = found
            weight = transform.operands[0]
            for op in chain:  # the same transposes and conversions, now of D
                out = self.fresh(op.results[0].name, op.results[0])
                self.ops.append(replace(op.with_operands((weight, *op.operands[1:])), results=(out,)))
                weight = out
            other = dot.operands[1 - side]
            moved = self.fresh(other.name, other)
            self.ops.append(replace(Op.make("input_transform", (other, *transform.operands[1:]), (moved,),
                                            block=transform.attr("block"), axis=_contracted_axis(dot, 1 - side),
                                            side="input"), loc=transform.loc))
            operands = (moved, weight) if side == 1 else (weight, moved)
            return dot.with_operands(operands)
        return dot

    def run(self, func: Function) -> Function:
        for op in func.ops:
            self.ops.append(self.fold(op) if op.opcode == "dot" else op)
        return Function(func.name, func.params, tuple(self.ops), func.returns)


def fold_function(func: Function) -> Function:
    if not any(op.opcode == "input_transform" for op in func.ops):
        return func
    return _Folder(func).run(func)


@register_pass
@dataclass(frozen=True)
class FoldInputTransforms(Pass):
    name = "fold-input-transforms"

    def run(self, module: Module) -> Module:
        return module.replace_functions([fold_function(f) for f in module.functions])
