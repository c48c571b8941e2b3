"""Inlining: every ``call`` op is replaced by a copy of its callee's body (renamed apart), until
no calls remain; functions that are no longer called are dropped."""

from __future__ import annotations

from dataclasses import dataclass

from fusec.ir import Function, Module, Op, Value
from fusec.passes.base import Pass, register_pass
from fusec.passes.rewrite import drop_unreferenced_functions, substitute, substitute_returns


def _inline_calls(func: Function, module: Module, done: dict[str, Function]) -> Function:
    if func.name in done:
        return done[func.name]
    taken = {p.name for p in func.params} | {r.name for op in func.ops for r in op.results}
    subst: dict[str, Value] = {}
    ops: list[Op] = []
    counter = 0

    def fresh(base: str, v: Value) -> Value:
        nonlocal counter
        name = f"{base}.{v.name}"
        while name in taken:
            counter += 1
            name = f"{base}.{v.name}.{counter}"
        taken.add(name)
        return Value(name, v.type)

    for op in func.ops:
        op = substitute(op, subst)
        if op.opcode != "call":
            ops.append(op)
            continue
        callee = _inline_calls(module.function(str(op.attr("callee"))), module, done)
        inner: dict[str, Value] = {p.name: a for p, a in zip(callee.params, op.operands)}
        for inner_op in callee.ops:
            renamed = tuple(fresh(callee.name, r) for r in inner_op.results)
            inner.update({r.name: n for r, n in zip(inner_op.results, renamed)})
            ops.append(Op(inner_op.opcode, tuple(inner[v.name] for v in inner_op.operands), renamed, inner_op.attrs,
                          f"{op.loc}/{inner_op.loc}" if op.loc and inner_op.loc else inner_op.loc))
        subst.update({r.name: inner[v.name] for r, v in zip(op.results, callee.returns)})
    done[func.name] = Function(func.name, func.params, tuple(ops), substitute_returns(func.returns, subst))
    return done[func.name]


@register_pass
@dataclass(frozen=True)
class Inline(Pass):
    name = "inline"

    def run(self, module: Module) -> Module:
        done: dict[str, Function] = {}
        return drop_unreferenced_functions(
            module.replace_functions([_inline_calls(f, module, done) for f in module.functions]))
