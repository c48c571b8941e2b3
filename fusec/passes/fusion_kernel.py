"""A fusion group made into a kernel: its function (with broadcasts folded into size-1 loads,
splats and iotas cloned, shared low-bit weights unpacked from a copy) and the ``kernel`` op that
calls it, with its cost."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from fusec.ir import Function, Op, TensorType, Value
from fusec.passes.cost import Cost, nbytes, op_flops
from fusec.passes.fusion_rules import clonable
from fusec.passes.rewrite import fresh_name


@dataclass
class FusionGroup:
    """Ops fusion has put in one kernel so far, over one iteration space."""

    id: int
    kind: str
    space: tuple[int, ...]
    members: list[int] = field(default_factory=list)
    values: set[str] = field(default_factory=set)
    reduce_axes: tuple[int, ...] | None = None  # a reduction group's reduced axes (its first reduce's)

    @property
    def row_axes(self) -> tuple[int, ...]:
        return self.reduce_axes if self.reduce_axes is not None else (len(self.space) - 1,)


class FuserState(Protocol):
    """What extracting a kernel reads of the fusion pass's state."""

    func: Function
    producer: dict[str, Op]
    absorbable: set[str]
    cloned_dequantize: set[str]


def _expanded_shape(op: Op) -> tuple[int, ...]:
    """The broadcast operand's shape, padded with 1s to the result's rank."""
    shape = [1] * op.result.type.rank
    for src, dst in enumerate(op.attr("dims")):
        shape[dst] = op.operands[0].type.shape[src]
    return tuple(shape)


def extract_kernel(fuser: FuserState, g: FusionGroup, name: str, uses_outside: set[str], taken: set[str]
             ) -> tuple[list[Op], Op, Function]:
    """The reshapes feeding the kernel, the kernel op, and the kernel's function."""
    ops = fuser.func.ops
    params: list[Value] = []
    inputs: list[Value] = []
    pre: list[Op] = []
    body: list[Op] = []
    keyed: dict[tuple, Value] = {}
    local: set[str] = set()

    # Kernel parameters need names unique in the kernel; reshapes added to the caller, in the caller.
    inside = {r.name for i in g.members for r in ops[i].results}

    def param(key: tuple, outer: Value, type_: TensorType) -> Value:
        if key not in keyed:
            p = Value(fresh_name(outer.name, inside), type_)
            keyed[key] = p
            params.append(p)
            if type_ != outer.type:
                reshaped = Value(fresh_name(f"{outer.name}.r", taken), type_)
                pre.append(Op.make("reshape", [outer], [reshaped], shape=type_.shape))
                outer = reshaped
            inputs.append(outer)
        return keyed[key]

    def operand(v: Value, role: str) -> Value:
        if v.name in g.values or (v.name in local and role == "load"):
            return v
        producer = fuser.producer.get(v.name)
        if role == "dot" and v.name in fuser.cloned_dequantize and producer is not None:
            local.add(v.name)
            body.append(producer.with_operands(tuple(operand(u, "dq") for u in producer.operands)))
            return v
        if clonable(producer):
            # A dot's operands are read by its K loop from kernel inputs, so a splat or iota feeding
            # a dot is materialised outside and passed in; loads recompute it in the kernel. The
            # parameter is named apart from the clone, which keeps the value's own name.
            if role != "load":
                inside.add(v.name)
                return param((role, v.name), v, v.type)
            local.add(v.name)
            body.append(producer)  # type: ignore[arg-type]
            return v
        if v.name in fuser.absorbable and role == "load":
            # Load the broadcast's source with size-1 dimensions; broadcast it in the kernel.
            assert producer is not None
            src = producer.operands[0]
            p = param(("expand", src.name, producer.attr("dims")), src,
                      TensorType(src.type.elem, _expanded_shape(producer)))
            local.add(v.name)
            body.append(Op.make("broadcast", [p], [v], dims=tuple(range(v.type.rank)), shape=v.type.shape))
            return v
        return param((role, v.name), v, v.type)

    flops = 0
    for i in sorted(g.members):
        op = ops[i]
        flops += op_flops(op)
        role = {"dot": "dot", "dequantize": "dq"}.get(op.opcode, "load")
        body.append(op.with_operands(tuple(operand(v, role) for v in op.operands)))
    outputs = [ops[i].results[0] for i in g.members if ops[i].results[0].name in uses_outside]
    func = Function(name, tuple(params), tuple(body), tuple(outputs))
    cost = Cost(sum(nbytes(v.type) for v in inputs), sum(nbytes(v.type) for v in outputs), flops)
    extra = {"reduce_axes": g.reduce_axes} if g.kind == "reduction" and g.row_axes != (len(g.space) - 1,) else {}
    kernel = Op.make("kernel", inputs, outputs, callee=name, kind=g.kind, space=g.space,
                     bytes_read=cost.bytes_read, bytes_written=cost.bytes_written, flops=cost.flops, **extra)
    return pre, kernel, func
