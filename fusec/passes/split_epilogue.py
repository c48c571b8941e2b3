"""``split-epilogue``: a skinny low-bit matmul kernel (M <= 16 rows) keeps only its K reduction,
in f32; its epilogue (bias, activation) moves after it, where a second ``fuse`` makes it a
small kernel of its own. An epilogue that is only a cast stays in the kernel, after an explicit
f32 accumulation (:func:`cast_epilogue`): a split K loop finishes it in the same kernel.

That is what lets ``tile`` split the K loop across programs (split-K): partial sums can only be
added into the output (atomically, into a zero-initialised f32 array) when nothing non-linear
follows the dot inside the kernel. The result is exact as before: the dot accumulated in f32 and
rounded once, and still does.
"""

from __future__ import annotations

from dataclasses import dataclass

from fusec.ir import Function, LowBitType, Module, Op, TensorType, Value
from fusec.ir.types import F32
from fusec.passes.base import Pass, register_pass
from fusec.passes.cost import nbytes, op_flops
from fusec.passes.rewrite import fresh_name

MAX_ROWS = 16  # the GEMV strategy's rows (tiling's "gemv")


def cast_epilogue(callee: Function) -> Op | None:
    """The ``convert`` of a kernel that is a low-bit matmul's f32 K reduction and then only a cast
    of it (split-epilogue keeps that cast in the kernel: a split K loop finishes it in the same
    kernel, in the program that adds the last partial sum), or None."""
    ops = callee.ops
    if len(ops) != 3 or [o.opcode for o in ops] != ["dequantize", "dot", "convert"]:
        return None
    dq, dot, cast = ops
    if dot.result.type.elem != F32 or cast.operands[0].name != dot.result.name or \
            callee.returns != (cast.result,) or dot.operands[1].name != dq.result.name:
        return None
    return cast


def _with_cast(callee: Function, dq: Op, dot: Op) -> Function:
    """``callee`` (a dequantize and a dot, returning the dot's non-f32 result) with the dot
    accumulating to f32 and a ``convert`` after it."""
    acc = Value(f"{dot.result.name}.acc", TensorType(F32, dot.result.type.shape))
    new_dot = Op(dot.opcode, dot.operands, (acc,), Op.make("dot", **(dot.attr_dict | {"out_dtype": "f32"})).attrs,
                 dot.loc)
    cast = Op.make("convert", [acc], [dot.result], dtype=str(dot.result.type.elem))
    return Function(callee.name, callee.params, (dq, new_dot, cast), callee.returns)


def _reduction_part(callee: Function) -> tuple[Op, Op] | None:
    """The kernel's dequantize and dot when it is a skinny low-bit matmul with an epilogue to move."""
    dqs = [o for o in callee.ops if o.opcode == "dequantize"]
    dots = [o for o in callee.ops if o.opcode == "dot"]
    if len(dqs) != 1 or len(dots) != 1:
        return None
    dq, dot = dqs[0], dots[0]
    params = {p.name for p in callee.params}
    if dot.operands[1] is not dq.result and dot.operands[1].name != dq.result.name:
        return None
    if dot.operands[0].name not in params or not all(v.name in params for v in dq.operands):
        return None
    if dot.result.type.rank != 2 or dot.result.type.shape[0] > MAX_ROWS or bool(dot.attr("lhs_t")):
        return None
    if not isinstance(dq.operands[0].type.elem, LowBitType) or not dot.result.type.elem.is_float:
        return None
    if callee.returns == (dot.result,) and dot.result.type.elem == F32:
        return None  # already only the reduction
    if cast_epilogue(callee) is not None:
        return None  # the reduction and its cast: one kernel
    if len(callee.returns) != 1:
        return None
    return dq, dot


def _split(op: Op, callee: Function, dq: Op, dot: Op, taken: set[str]) -> tuple[list[Op], Function]:
    """The reduction-only kernel op and the epilogue ops that follow it in the caller, and the new callee."""
    outer = {p.name: v for p, v in zip(callee.params, op.operands)}
    kept = [i for i, p in enumerate(callee.params) if p.name == dot.operands[0].name or
            any(p.name == v.name for v in dq.operands)]
    acc_t = TensorType(F32, dot.result.type.shape)
    acc = Value(dot.result.name, acc_t)
    new_dot = Op(dot.opcode, dot.operands, (acc,), Op.make("dot", **(dot.attr_dict | {"out_dtype": "f32"})).attrs,
                 dot.loc)
    new_callee = Function(callee.name, tuple(callee.params[i] for i in kept), (dq, new_dot), (acc,))
    inputs = [op.operands[i] for i in kept]
    result = Value(fresh_name(f"{op.results[0].name}.acc", taken), acc_t)
    attrs = {k: v for k, v in op.attr_dict.items() if k not in ("tile",)}
    attrs |= {"bytes_read": sum(nbytes(v.type) for v in inputs), "bytes_written": nbytes(acc_t),
              "flops": op_flops(new_dot)}
    kernel = Op(op.opcode, tuple(inputs), (result,), Op.make("kernel", **attrs).attrs, op.loc)
    ops = [kernel]
    renamed: dict[str, Value] = dict(outer)
    if dot.result.type.elem == F32:
        renamed[dot.result.name] = result
    else:
        cast = Value(fresh_name(dot.result.name, taken), dot.result.type)
        ops.append(Op.make("convert", [result], [cast], dtype=str(dot.result.type.elem)))
        renamed[dot.result.name] = cast
    for o in callee.ops:
        if o is dq or o is dot:
            continue
        if o.results and callee.returns[0].name == o.results[0].name:
            results = op.results  # the kernel's result keeps its name in the caller
        else:
            results = tuple(Value(fresh_name(r.name, taken), r.type) for r in o.results)
        renamed.update({r.name: n for r, n in zip(o.results, results)})
        ops.append(Op(o.opcode, tuple(renamed[v.name] for v in o.operands), results, o.attrs, o.loc))
    if callee.returns[0].name == dot.result.name:  # only a cast followed the dot
        last = ops[-1]
        ops[-1] = Op(last.opcode, last.operands, op.results, last.attrs, last.loc)
    return ops, new_callee


@register_pass
@dataclass(frozen=True)
class SplitEpilogue(Pass):
    """Moves the epilogue of each skinny low-bit matmul kernel after it (see the module docstring)."""

    name = "split-epilogue"

    def run(self, module: Module) -> Module:
        functions = {f.name: f for f in module.functions}
        out: list[Function] = []
        replaced: dict[str, Function] = {}
        for f in module.functions:
            taken = {v.name for v in f.params} | {r.name for o in f.ops for r in o.results}
            ops: list[Op] = []
            for op in f.ops:
                callee = functions.get(str(op.attr("callee"))) if op.opcode == "kernel" else None
                found = _reduction_part(callee) if callee is not None and op.attr("kind") == "matmul" and \
                    not op.attr("in_views") and not op.attr("out_views") and len(op.results) == 1 else None
                if callee is None or found is None:
                    ops.append(op)
                    continue
                dq, dot = found
                if callee.ops == (dq, dot) and callee.returns == (dot.result,):
                    # Only a cast follows the dot: it stays in the kernel (see cast_epilogue).
                    replaced[callee.name] = _with_cast(callee, dq, dot)
                    ops.append(op)
                    continue
                new_ops, replaced[callee.name] = _split(op, callee, dq, dot, taken)
                ops += new_ops
            out.append(Function(f.name, f.params, tuple(ops), f.returns))
        return module.replace_functions([replaced.get(f.name, f) for f in out])
