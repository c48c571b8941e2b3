"""The cost model: bytes moved to and from global memory, and FLOPs.

An op run on its own (the op-by-op program) reads every operand and writes every result once;
a fused kernel reads its inputs and writes its outputs once, whatever happens inside. Reshapes are
free (a bitcast) and splat constants and iotas are computed where they are used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fusec.ir import PER_CHANNEL, DType, Function, LowBitType, Op, TensorType

FREE_OPS = frozenset({"reshape", "constant", "iota", "stop_gradient"})


@dataclass(frozen=True)
class Cost:
    bytes_read: int = 0
    bytes_written: int = 0
    flops: int = 0

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.bytes_read + other.bytes_read, self.bytes_written + other.bytes_written,
                    self.flops + other.flops)


def nbytes(t: TensorType) -> int:
    """Bytes of a tensor. A low-bit [K, N, ...] weight counts its packed codes (K padded to 32, as
    fusec packs them) plus one scale per group and column, taken as bfloat16 (the type does not
    record the scale dtype), and a one-byte zero-point per group for zero-point formats."""
    if isinstance(t.elem, LowBitType) and t.rank >= 1:
        k = t.shape[0]
        columns = t.size // k if k else 0
        codes = math.ceil(-(-k // 32) * 32 * columns * t.elem.bits / 8)
        groups = 0 if t.elem.group is None else (1 if t.elem.group == PER_CHANNEL else -(-k // t.elem.group))
        return codes + groups * columns * (2 + int(t.elem.zero_point))
    bits = t.elem.bits if isinstance(t.elem, DType) else 32
    return math.ceil(t.size * bits / 8)


def op_flops(op: Op) -> int:
    if op.opcode == "dot":
        lhs = op.operands[0].type
        k = lhs.shape[-2] if op.attr("lhs_t") else lhs.shape[-1]
        return 2 * op.result.type.size * k
    if op.opcode in ("reduce", "argmax", "argmin"):
        return op.operands[0].type.size
    if op.opcode == "input_transform":  # a [b, b] matmul per block of the axis, and the scale
        return op.result.type.size * (2 * int(op.attr("block")) + (len(op.operands) - 1))
    if op.opcode in FREE_OPS or op.opcode in ("broadcast", "transpose", "slice", "concatenate", "convert"):
        return 0
    return sum(r.type.size for r in op.results)


def op_cost(op: Op) -> Cost:
    """The cost of ``op`` run as its own kernel (a kernel op's own account: reading through
    folded views, it moves less than its operands' whole arrays)."""
    if op.opcode in FREE_OPS:
        return Cost()
    if op.opcode == "kernel" and "bytes_read" in op.attr_dict:
        return Cost(int(op.attr("bytes_read")), int(op.attr("bytes_written")), int(op.attr("flops")))
    return Cost(sum(nbytes(v.type) for v in op.operands), sum(nbytes(r.type) for r in op.results), op_flops(op))


def function_cost(func: Function) -> Cost:
    """Op-by-op cost of a function (kernel ops count as one kernel each)."""
    total = Cost()
    for op in func.ops:
        total = total + op_cost(op)
    return total
