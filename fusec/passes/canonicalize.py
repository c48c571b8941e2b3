"""Canonicalisation: small local rewrites to a normal form, applied forward until nothing changes.

Each rule takes an op and the ops producing its operands and returns a replacement op, an existing
value that replaces the op's result, or None.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fusec.ir import OPDEFS, DType, Function, Module, Op, Value
from fusec.passes.base import Pass, register_pass
from fusec.passes.rewrite import rewrite_forward

Producers = Mapping[str, Op]
Rule = Callable[[Op, Producers], "Op | Value | None"]
RULES: dict[str, list[Rule]] = {}


def rule(*opcodes: str) -> Callable[[Rule], Rule]:
    def wrap(fn: Rule) -> Rule:
        for opcode in opcodes:
            RULES.setdefault(opcode, []).append(fn)
        return fn
    return wrap


def _producer(op: Op, i: int, producers: Producers, opcode: str) -> Op | None:
    p = producers.get(op.operands[i].name)
    return p if p is not None and p.opcode == opcode else None


@rule("stop_gradient")
def _stop_gradient(op: Op, producers: Producers) -> Value:
    # stop_gradient(x) -> x: the IR is forward-only; derivatives come from the original jaxpr
    return op.operands[0]


@rule("reshape", "broadcast", "convert")
def _identity(op: Op, producers: Producers) -> Value | None:
    # reshape/broadcast/convert to the operand's own type -> operand
    return op.operands[0] if op.operands[0].type == op.result.type else None


@rule("transpose")
def _transpose(op: Op, producers: Producers) -> Op | Value | None:
    perm = op.attr("perm")
    if list(perm) == list(range(len(perm))):
        return op.operands[0]  # transpose by the identity -> operand
    inner = _producer(op, 0, producers, "transpose")
    if inner is None:
        return None
    # transpose(transpose(x, p), q) -> transpose(x, p[q])
    inner_perm = inner.attr("perm")
    return Op.make("transpose", inner.operands, op.results, perm=tuple(inner_perm[q] for q in perm))


@rule("reshape")
def _reshape_of_reshape(op: Op, producers: Producers) -> Op | None:
    inner = _producer(op, 0, producers, "reshape")
    # reshape(reshape(x)) -> reshape(x)
    return None if inner is None else Op.make("reshape", inner.operands, op.results, shape=op.attr("shape"))


@rule("broadcast")
def _broadcast_of_broadcast(op: Op, producers: Producers) -> Op | None:
    inner = _producer(op, 0, producers, "broadcast")
    if inner is None:
        return None
    # broadcast(broadcast(x, d1), d2) -> broadcast(x, d2[d1])
    outer_dims = op.attr("dims")
    return Op.make("broadcast", inner.operands, op.results, shape=op.attr("shape"),
                   dims=tuple(outer_dims[d] for d in inner.attr("dims")))


def _swaps_last_two(perm: tuple[int, ...]) -> bool:
    n = len(perm)
    return n >= 2 and tuple(perm) == tuple(range(n - 2)) + (n - 1, n - 2)


@rule("dot")
def _dot_of_transpose(op: Op, producers: Producers) -> Op | None:
    for i, flag in ((0, "lhs_t"), (1, "rhs_t")):
        inner = _producer(op, i, producers, "transpose")
        if inner is not None and _swaps_last_two(inner.attr("perm")):
            # dot(transpose(a), b) -> dot(a, b) with the operand's layout flag flipped
            operands = list(op.operands)
            operands[i] = inner.operands[0]
            attrs = op.attr_dict | {flag: not op.attr(flag)}
            return Op.make("dot", operands, op.results, **attrs)
    return None


def _apply_rules(op: Op, producers: Producers) -> Op | tuple[Value, ...]:
    changed = True
    while changed:
        changed = False
        for fn in RULES.get(op.opcode, ()):
            result = fn(op, producers)
            if isinstance(result, Value):
                return (result,)
            if result is not None:
                # A rewrite stands for the op it replaces, so it keeps that op's equation.
                op, changed = (result if result.loc else dataclasses.replace(result, loc=op.loc)), True
                break
    return op


def _transpose_of_dot(op: Op, producers: Producers, uses: Mapping[str, int]) -> Op | None:
    """transpose(dot(a, b)) over the last two axes -> dot(b, a) with both layout flags flipped
    ((AB)^T = B^T A^T), where the transpose is the dot's only user; vmapped ``W @ x`` takes this
    form, and the matmul then meets its epilogue without a transpose in between."""
    dot = _producer(op, 0, producers, "dot")
    if dot is None or uses.get(dot.result.name) != 1 or not _swaps_last_two(op.attr("perm")):
        return None
    if any(v.type.rank != op.result.type.rank for v in dot.operands):
        return None
    attrs = dot.attr_dict | {"lhs_t": not dot.attr("rhs_t"), "rhs_t": not dot.attr("lhs_t")}
    return Op.make("dot", dot.operands[::-1], op.results, **attrs)


def canonicalize_function(func: Function) -> Function:
    uses = func.uses()  # value names survive the rewrite, so the original counts stay valid

    def visit(op: Op, producers: Producers) -> Op | tuple[Value, ...]:
        result = _apply_rules(op, producers)
        if isinstance(result, Op) and result.opcode == "transpose":
            swapped = _transpose_of_dot(result, producers, uses)
            if swapped is not None:
                dot = producers[result.operands[0].name]
                return _apply_rules(dataclasses.replace(swapped, loc=dot.loc), producers)
        return result

    # Producers are rewritten before their users, so one forward walk reaches the fixed point.
    return _mask_products_to_selects(rewrite_forward(_transposes_into_dots(func), visit))


def _transposes_into_dots(func: Function) -> Function:
    """transpose(e(dot(a, b), splat)) -> e(dot(b, a) flipped, splat'), for an elementwise ``e``
    whose only user is the transpose and whose other operands are splats: vmapped ``W @ x + c``
    takes this form, and the transpose would keep the matmul from its epilogue (and a low-bit
    weight from its fused kernel)."""
    producers, uses = func.producers(), func.uses()
    replaced: dict[int, list[Op]] = {}
    for t in func.ops:
        e = producers.get(t.operands[0].name) if t.opcode == "transpose" else None
        if e is None or OPDEFS[e.opcode].kind != "elementwise" or uses.get(e.result.name) != 1 \
                or not _swaps_last_two(t.attr("perm")) or len(e.results) != 1:
            continue
        new_ops: list[Op] = []
        operands = []
        for v in e.operands:
            p = producers.get(v.name)
            tv = Value(f"{v.name}.t{t.result.name}", v.type.with_shape(t.result.type.shape))
            if p is not None and p.opcode == "dot" and uses.get(v.name) == 1 and \
                    all(u.type.rank == v.type.rank for u in p.operands):
                attrs = p.attr_dict | {"lhs_t": not p.attr("rhs_t"), "rhs_t": not p.attr("lhs_t")}
                new_ops.append(dataclasses.replace(Op.make("dot", p.operands[::-1], [tv], **attrs), loc=p.loc))
            elif p is not None and p.opcode == "broadcast" and p.attr("dims") == ():
                new_ops.append(Op.make("broadcast", p.operands, [tv], dims=(), shape=tv.type.shape))
            else:
                break
            operands.append(tv)
        else:
            if any(op.opcode == "dot" for op in new_ops):
                replaced[id(t)] = new_ops + [dataclasses.replace(e.with_operands(tuple(operands)), results=t.results)]
    if not replaced:
        return func
    ops = [new for op in func.ops for new in replaced.get(id(op), [op])]
    return Function(func.name, func.params, tuple(ops), func.returns)


def _mask_products_to_selects(func: Function) -> Function:
    """x * convert(mask) -> select(mask, 0, x) for floats, as XLA's simplifier rewrites it: the
    gradients of max/min multiply a cotangent by such a mask, and inf * 0 would be NaN where
    ``jax.jit`` gives 0. The zero is a new splat constant, hence a walk of its own."""
    producers = {r.name: op for op in func.ops for r in op.results}
    taken = {v.name for v in func.params} | set(producers)
    ops: list[Op] = []
    for op in func.ops:
        mask = next((i for i, v in enumerate(op.operands) if _is_float_of_bool(producers.get(v.name))), None)
        if op.opcode != "mul" or mask is None:
            ops.append(op)
            continue
        pred = producers[op.operands[mask].name].operands[0]
        x, out = op.operands[1 - mask], op.result
        name = f"{out.name}.zero"
        while name in taken:
            name += "_"
        taken.add(name)
        zero = Value(name, out.type)
        ops.append(dataclasses.replace(Op.make("constant", (), (zero,), value=0.0, dtype=str(out.type.elem),
                                               shape=out.type.shape), loc=op.loc))
        ops.append(dataclasses.replace(Op.make("select", (pred, zero, x), op.results), loc=op.loc))
    return Function(func.name, func.params, tuple(ops), func.returns)


def _is_float_of_bool(op: Op | None) -> bool:
    if op is None or op.opcode != "convert":
        return False
    src, out = op.operands[0].type.elem, op.result.type.elem
    return isinstance(src, DType) and src.is_bool and isinstance(out, DType) and out.is_float


@register_pass
@dataclass(frozen=True)
class Canonicalize(Pass):
    name = "canonicalize"

    def run(self, module: Module) -> Module:
        return module.replace_functions([canonicalize_function(f) for f in module.functions])
