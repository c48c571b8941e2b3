"""Common-subexpression elimination: an op identical to an earlier one (opcode, operands,
attributes, result types) is replaced by it. Opaque ops are distinct by reference and never merged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fusec.ir import Function, Module, Op, Value
from fusec.passes.base import Pass, register_pass
from fusec.passes.rewrite import substitute, substitute_returns


def cse_function(func: Function) -> Function:
    seen: dict[Any, Op] = {}
    subst: dict[str, Value] = {}
    ops: list[Op] = []
    for op in func.ops:
        op = substitute(op, subst)
        if op.opcode == "opaque":
            ops.append(op)
            continue
        key = (op.opcode, tuple(v.name for v in op.operands), op.attrs, tuple(r.type for r in op.results))
        prior = seen.get(key)
        if prior is None:
            seen[key] = op
            ops.append(op)
        else:
            subst.update({r.name: p for r, p in zip(op.results, prior.results)})
    return Function(func.name, func.params, tuple(ops), substitute_returns(func.returns, subst))


@register_pass
@dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    name = "cse"

    def run(self, module: Module) -> Module:
        return module.replace_functions([cse_function(f) for f in module.functions])
