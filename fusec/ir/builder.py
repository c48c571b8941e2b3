"""Builds functions op by op, naming values and inferring result types."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fusec.ir.function import Function, Op, Value
from fusec.ir.opdefs import TypeRuleError, infer_result_types
from fusec.ir.types import TensorType


class Builder:
    """Collects params and ops of one function; value names are ``prefix`` + a counter."""

    def __init__(self, name: str = "main", prefix: str = "") -> None:
        self.name = name
        self.prefix = prefix
        self.params: list[Value] = []
        self.ops: list[Op] = []
        self._counter = 0
        self._taken: set[str] = set()

    def fresh(self, type_: TensorType, hint: str | None = None) -> Value:
        """A new value of ``type_``, named after ``hint`` if it is free, else numbered."""
        if hint is not None and hint not in self._taken:
            name = hint
        else:
            while True:
                name = f"{self.prefix}{self._counter}"
                self._counter += 1
                if name not in self._taken:
                    break
        self._taken.add(name)
        return Value(name, type_)

    def param(self, type_: TensorType, hint: str | None = None) -> Value:
        value = self.fresh(type_, hint)
        self.params.append(value)
        return value

    def op(self, opcode: str, operands: Sequence[Value] = (), **attrs: Any) -> Value:
        """Appends an op with one inferred result and returns that result."""
        return self.op_multi(opcode, operands, **attrs)[0]

    def op_multi(self, opcode: str, operands: Sequence[Value] = (),
                 result_types: Sequence[TensorType] | None = None, **attrs: Any) -> list[Value]:
        """Appends an op; result types are inferred unless given (as for opaque ops and calls)."""
        probe = Op.make(opcode, operands, (), **attrs)
        if result_types is None:
            try:
                result_types = infer_result_types(opcode, [v.type for v in operands], probe.attr_dict)
            except TypeRuleError as e:
                raise ValueError(f"cannot build {opcode!r}: {e}") from None
        results = tuple(self.fresh(t) for t in result_types)
        self.ops.append(Op(opcode, tuple(operands), results, probe.attrs))
        return list(results)

    def finish(self, returns: Sequence[Value]) -> Function:
        return Function(self.name, tuple(self.params), tuple(self.ops), tuple(returns))
