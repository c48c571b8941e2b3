"""Common-subexpression elimination: an op identical to an earlier one (opcode, operands,
attributes compared bitwise, result types) is replaced by it. Opaque ops are distinct by
reference and never merged."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fusec.ir import Function, Module, Op, Value
from fusec.ir.function import attr_key
from fusec.passes.base import Pass, register_pass
from fusec.passes.rewrite import rewrite_forward


def cse_function(func: Function) -> Function:
    seen: dict[Any, Op] = {}

    def visit(op: Op, producers: Mapping[str, Op]) -> Op | tuple[Value, ...]:
        if op.opcode == "opaque":
            return op
        # Attributes compare bitwise: constants 0.0 and -0.0 are different ops.
        attrs = tuple((k, attr_key(v)) for k, v in op.attrs)
        key = (op.opcode, tuple(v.name for v in op.operands), attrs, tuple(r.type for r in op.results))
        prior = seen.setdefault(key, op)
        return op if prior is op else prior.results

    return rewrite_forward(func, visit)


@register_pass
@dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    name = "cse"

    def run(self, module: Module) -> Module:
        return module.replace_functions([cse_function(f) for f in module.functions])
