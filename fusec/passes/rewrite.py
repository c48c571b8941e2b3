"""Small helpers shared by passes: substituting values and dropping unreferenced functions."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from fusec.ir import Function, Module, Op, Value


def fresh_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base.1``, ``base.2``, ... : the first not in ``taken``, which it joins."""
    n, name = 0, base
    while name in taken:
        n += 1
        name = f"{base}.{n}"
    taken.add(name)
    return name


def substitute(op: Op, subst: Mapping[str, Value]) -> Op:
    """``op`` with each operand replaced by ``subst[name]`` where present."""
    if not any(v.name in subst for v in op.operands):
        return op
    return op.with_operands(tuple(subst.get(v.name, v) for v in op.operands))


def substitute_returns(returns: tuple[Value, ...], subst: Mapping[str, Value]) -> tuple[Value, ...]:
    return tuple(subst.get(v.name, v) for v in returns)


def called_functions(func: Function) -> set[str]:
    """Functions ``func`` refers to: callees, opaque ops' bodies, tile programs and loop bodies."""
    names = {str(op.attr("callee")) for op in func.ops if op.opcode in ("call", "kernel")}
    names |= {str(op.attr(key)) for op in func.ops if op.opcode == "kernel" for key in ("tile", "pattern")
              if op.attr(key) is not None}
    names |= {str(op.attr("body")) for op in func.ops if op.opcode == "loop"}
    return names | {str(b) for op in func.ops if op.opcode == "opaque" for b in op.attr("bodies", ())}


def drop_unreferenced_functions(module: Module) -> Module:
    """Keeps the entry and every function reachable from it by calls."""
    keep = {module.entry.name}
    work = [module.entry]
    while work:
        for name in called_functions(work.pop()):
            if name not in keep:
                keep.add(name)
                work.append(module.function(name))
    return module.replace_functions([f for f in module.functions if f.name in keep])


Visit = Callable[[Op, Mapping[str, Op]], "Op | tuple[Value, ...]"]


def rewrite_forward(func: Function, visit: Visit) -> Function:
    """Walks ``func``'s ops in order with earlier replacements already applied to their operands.

    ``visit(op, producers)`` returns the op to keep (itself or a rewrite with the same results), or a
    tuple of existing values that replace the op's results (the op is dropped). ``producers`` maps
    each kept value name to the op defining it.
    """
    producers: dict[str, Op] = {}
    subst: dict[str, Value] = {}
    ops: list[Op] = []
    for op in func.ops:
        result = visit(substitute(op, subst), producers)
        if isinstance(result, Op):
            ops.append(result)
            producers.update({r.name: result for r in result.results})
        else:
            subst.update({r.name: v for r, v in zip(op.results, result)})
    return Function(func.name, func.params, tuple(ops), substitute_returns(func.returns, subst))
