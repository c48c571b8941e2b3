"""Which derivative a compiled program takes: through its kernels, or from the original jaxpr.

The IR is forward-only: the frontend inlines custom-derivative bodies and canonicalize drops
``stop_gradient``. So a program is differentiated by JAX differentiating the original jaxpr,
except where that would rebuild what fusec fused away: a program with attention kernels is
differentiated through its kernels (their fused backward, every other kernel's reference, the glue
as XLA runs it) when that derivative is the original's: no custom-derivative rule was inlined, and
every ``stop_gradient`` sat inside a recognised softmax (the row-max shift, which changes no
derivative)."""

from __future__ import annotations

from typing import Any

from jax.extend.core import jaxprs_in_params

from fusec.ir import Module

NO_ATTENTION = "no attention kernel"
_CUSTOM = ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")


def _rule_name(eqn: Any) -> str:
    """The function a custom-derivative equation wraps (``relu``), else the primitive's name."""
    body = eqn.params.get("call_jaxpr", eqn.params.get("fun_jaxpr"))
    info = getattr(getattr(body, "jaxpr", body), "debug_info", None)
    where = str(getattr(info, "func_src_info", "") or "")
    return where.split(" ")[0] if where else eqn.primitive.name


def _custom_rules(jaxpr: Any) -> list[str]:
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _CUSTOM:
            found.append(_rule_name(eqn))
        for sub in jaxprs_in_params(eqn.params):
            found += _custom_rules(getattr(sub, "jaxpr", sub))
    return found


def kernel_ad_problem(jaxpr: Any, stages: tuple[tuple[str, Module], ...]) -> str | None:
    """None when the program (its ClosedJaxpr and pass stages) is differentiated through its
    kernels; else why the original jaxpr's derivative is taken (None also for no attention: then
    there is nothing to gain, and the original's is taken as always)."""
    final = stages[-1][1]
    attention = [op for op in final.all_ops() if op.opcode == "kernel" and op.attr("kind") == "attention"]
    if not attention:
        return NO_ATTENTION
    custom = _custom_rules(jaxpr.jaxpr)
    if custom:
        return f"it holds custom-derivative rules ({', '.join(sorted(set(custom)))})"
    inlined = next((m for name, m in stages if name == "inline"), stages[0][1])
    absorbed = {op.loc for k in attention for op in final.function(str(k.attr("callee"))).ops if op.loc}
    for func in inlined.functions:
        producer = {r.name: op for op in func.ops for r in op.results}
        users: dict[str, list[Any]] = {}
        for op in func.ops:
            for v in op.operands:
                users.setdefault(v.name, []).append(op)
        for op in func.ops:
            if op.opcode == "stop_gradient" and not _softmax_shift(op, producer, users, absorbed):
                return f"a stop_gradient ({op.loc or op.result.name}) outside a recognised attention's softmax"
    return None


def _softmax_shift(sg: Any, producer: dict[str, Any], users: dict[str, list[Any]], absorbed: set[str]) -> bool:
    """Whether ``sg`` is the row-max shift of a softmax that a recognised attention took in:
    ``sub(x, stop_gradient(max(-inf, reduce_max(x))))`` through broadcasts, the reduce and the sub
    in the kernel (the softmax is invariant to the shift, so dropping the stop_gradient changes no
    derivative)."""
    subs, frontier = [], [sg.result]
    while frontier:
        v = frontier.pop()
        for u in users.get(v.name, []):
            if u.opcode in ("broadcast", "reshape"):
                frontier.append(u.result)
            elif u.opcode == "sub" and u.operands[1].name == v.name and u.loc in absorbed:
                subs.append(u)
            else:
                return False
    v = sg.operands[0]
    for _ in range(6):
        op = producer.get(v.name)
        if op is None:
            return False
        if op.opcode == "reduce" and op.attr("kind") == "max":
            return bool(subs) and op.loc in absorbed and all(u.operands[0].name == op.operands[0].name for u in subs)
        if op.opcode not in ("broadcast", "max", "reshape"):
            return False
        # max(-inf, r) follows its non-constant side; broadcasts and reshapes their one operand.
        inner = [u for u in op.operands if not _splat(u, producer)] if op.opcode == "max" else list(op.operands)
        if len(inner) != 1:
            return False
        v = inner[0]
    return False


def _splat(v: Any, producer: dict[str, Any]) -> bool:
    op = producer.get(v.name)
    while op is not None and op.opcode == "broadcast":
        op = producer.get(op.operands[0].name)
    return op is not None and op.opcode == "constant"
