"""The kernels of an attention kernel's fused backward, built with the forward's backend.

:func:`attention_grad` makes, from a forward attention kernel op, the forward that also writes the
rows' log-sum-exp and the three backward parts of :mod:`fusec.passes.to_tile_attention_bwd`
(their kernel ops call renamed copies of the forward's callee, so each has a name and tiling of
its own), and says how each canonical gradient lands on the kernel's operands
(:class:`GradMap`). The runtime (``fusec.runtime.attention_vjp``) runs them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fusec.codegen.kernel_spec import KernelSpec
from fusec.errors import FusecError
from fusec.ir import Function, Module, Op, TensorType, Value
from fusec.ir.types import F32
from fusec.passes.attention_labels import Labels
from fusec.passes.attention_match import match_attention
from fusec.passes.cost import nbytes
from fusec.passes.tiling import tile_kernel_op
from fusec.passes.to_tile_attention_bwd import chain_gradient_problem

Builder = Callable[[Op, Module, bool], KernelSpec]


@dataclass(frozen=True)
class GradMap:
    """Where canonical gradient ``which`` ("dq", "dk" or "dv", f32[B, T, depth]) goes: operand
    ``position``, whose dimensions have ``roles`` (a merged heads axis starting at head ``offset``)."""

    which: str
    position: int
    roles: Labels
    offset: int
    depth: int


@dataclass(frozen=True, eq=False)
class AttentionGrad:
    """An attention kernel's fused backward: the forward with the log-sum-exp, the ``pre``, ``dkv``
    and ``dq`` kernels, the operands that take gradients and where the gradients go."""

    forward: KernelSpec
    pre: KernelSpec
    dkv: KernelSpec
    dq: KernelSpec
    diff_inputs: tuple[int, ...]
    maps: tuple[GradMap, ...]
    batch: int


def _no_reference(name: str) -> Callable[..., list[Any]]:
    def reference(*args: Any) -> list[Any]:
        raise FusecError(f"kernel {name} is part of a fused attention backward, which is differentiated through "
                         "its reference VJP, not through its own reference")
    return reference


def _sealed(spec: KernelSpec) -> KernelSpec:
    """``spec`` (and its GPU twin) with a reference that refuses to run: the backward kernels'
    callee is the forward's, whose reference computes something else."""
    gpu_builder = spec.gpu_builder

    def gpu() -> KernelSpec | None:
        built = gpu_builder() if gpu_builder is not None else None
        return None if built is None else _sealed(built)

    return dataclasses.replace(spec, reference=_no_reference(spec.name), gpu_builder=gpu if gpu_builder else None,
                               _gpu=[])


def attention_grad(op: Op, module: Module, interpret: bool, build: Builder) -> AttentionGrad | str:
    """The fused backward of attention kernel ``op``, or why it has none (then the reference's VJP
    runs, and the runtime says so)."""
    callee = module.function(str(op.attr("callee")))
    if op.attr("in_views") or op.attr("out_views"):
        return "it reads or writes through folded views"
    qk = next((o for o in callee.ops if o.opcode == "dot"), None)
    m = match_attention(callee, qk) if qk is not None else None
    if m is None:
        return "its ops are no longer an attention fusec recognises"
    problem = chain_gradient_problem(m)
    if problem is not None:
        return problem
    names = [p.name for p in callee.params]
    maps = tuple(GradMap(which, names.index(operand.value.name), operand.roles, operand.offset, depth)
                 for which, operand, depth in (("dq", m.q, m.head_dim), ("dk", m.k, m.head_dim),
                                               ("dv", m.v, m.value_dim)))
    diff = tuple(sorted({g.position for g in maps}))
    if {names.index(s.value.name) for s in m.inputs} & set(diff):
        return "a side input (bias or mask) is also Q, K or V"
    target = "interpret" if interpret else "gpu"
    row = TensorType(F32, (m.batch, m.tq))
    base = callee.name
    o_type = m.out.value.type
    attrs = {k: v for k, v in op.attr_dict.items() if k != "tile"}
    fwd_op = Op.make("kernel", list(op.operands), [op.results[0], Value(f"{base}.lse", row)],
                     **(attrs | {"bytes_written": int(attrs["bytes_written"]) + nbytes(row)}))
    functions: list[Function] = [callee]
    ops: dict[str, Op] = {}
    qkv_bytes = sum(nbytes(p.type) for p in callee.params)
    extra = [Value(f"{base}.do", o_type), Value(f"{base}.lse", row), Value(f"{base}.dd", row)]
    flops = int(op.attr("flops"))
    specs_in = {
        "pre": ([Value(f"{base}.o", o_type), Value(f"{base}.do", o_type)], [Value(f"{base}.dd", row)],
                (m.batch, m.tq, m.value_dim), 0, 2 * nbytes(o_type), 2 * m.batch * m.tq * m.value_dim),
        "dkv": (list(op.operands) + extra, [Value(f"{base}.dk", TensorType(F32, (m.batch, m.tk, m.head_dim))),
                                            Value(f"{base}.dv", TensorType(F32, (m.batch, m.tk, m.value_dim)))],
                (m.batch, m.tk, m.value_dim), m.tq, qkv_bytes + nbytes(o_type) + 2 * nbytes(row), 2 * flops),
        "dq": (list(op.operands) + extra, [Value(f"{base}.dq", TensorType(F32, (m.batch, m.tq, m.head_dim)))],
               (m.batch, m.tq, m.head_dim), m.tk, qkv_bytes + nbytes(o_type) + 2 * nbytes(row), 3 * flops // 2),
    }
    for part, (operands, results, space, steps, read, part_flops) in specs_in.items():
        name = f"{base}.{part}"
        functions.append(Function(name, callee.params, callee.ops, callee.returns))
        ops[part] = Op.make("kernel", operands, results, callee=name, kind="attention_bwd", part=part,
                            space=space, steps=steps, bytes_read=read,
                            bytes_written=sum(nbytes(r.type) for r in results), flops=part_flops)
    grad_module = Module(tuple(functions))
    by_name = {f.name: f for f in functions}
    try:
        fwd = build(tile_kernel_op(fwd_op, by_name, target), grad_module, interpret)
        parts = {part: _sealed(build(tile_kernel_op(o, by_name, target), grad_module, interpret))
                 for part, o in ops.items()}
    except FusecError as e:
        return f"its backward kernels cannot be built ({e})"
    return AttentionGrad(dataclasses.replace(fwd, reference=_no_reference(fwd.name)), parts["pre"], parts["dkv"],
                         parts["dq"], diff, maps, m.batch)
