"""Dead-code elimination: drops ops none of whose results is used, and uncalled functions.

Opaque ops marked ``effects`` (callbacks, prints) and a tile program's stores are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from fusec.ir import Function, Module, Op
from fusec.passes.base import Pass, register_pass
from fusec.passes.rewrite import drop_unreferenced_functions


def has_effects(op: Op) -> bool:
    return (op.opcode == "opaque" and bool(op.attr("effects", False))) or \
        op.opcode in ("store", "atomic_add", "barrier", "arrive")


def dce_function(func: Function) -> Function:
    live = {v.name for v in func.returns}
    kept: list[Op] = []
    for op in reversed(func.ops):
        if has_effects(op) or any(r.name in live for r in op.results):
            kept.append(op)
            live.update(v.name for v in op.operands)
    return Function(func.name, func.params, tuple(reversed(kept)), func.returns)


@register_pass
@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    name = "dce"

    def run(self, module: Module) -> Module:
        return drop_unreferenced_functions(module.replace_functions([dce_function(f) for f in module.functions]))
