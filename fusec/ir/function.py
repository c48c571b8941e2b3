"""SSA values, ops, functions and modules: immutable; passes build new ones."""

from __future__ import annotations

import math
import numbers
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from fusec.ir.types import TensorType

Attr = Union[int, float, bool, str, tuple["Attr", ...]]  # noqa: UP007  (a recursive alias needs Union)


@dataclass(frozen=True)
class Value:
    """An SSA value: a name unique within its function, and a type."""

    name: str
    type: TensorType

    def __str__(self) -> str:
        return f"%{self.name}"


# One shared NaN object per sign: tuples compare elements by identity first, so attributes
# holding NaN still compare equal after a print/parse round trip. The sign is kept (copysign and
# bit casts see it), the payload is not.
NAN = float("nan")
NEG_NAN = -NAN


def _freeze_attr(value: Any) -> Attr:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze_attr(v) for v in value)
    if isinstance(value, float) and value != value:
        return NEG_NAN if math.copysign(1.0, value) < 0 else NAN
    if isinstance(value, (bool, int, float, str)):
        return value
    # NumPy scalars (np.int64 from a shape computation, np.bool_) become plain Python values.
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return _freeze_attr(float(value))
    if type(value).__name__ == "bool_":
        return bool(value)
    raise TypeError(f"IR attribute values are int, float, bool, str or tuples of them; got {value!r}")


def attr_key(value: Attr) -> Any:
    """A hashable key equal for two attribute values only when they are bitwise the same: Python's
    ``==`` merges 0.0 and -0.0 (and hashes them alike) and never matches NaN, so floats are keyed
    by their IEEE bits (and kept apart from the ints and bools that equal them)."""
    if isinstance(value, tuple):
        return tuple(attr_key(v) for v in value)
    if isinstance(value, float):
        return ("float", struct.pack("<d", value))
    return (type(value).__name__, value)


@dataclass(frozen=True)
class Op:
    """One operation: ``results = opcode(operands) {attrs}``. Attributes are sorted by key.

    ``loc`` names the JAX equation the op came from (``"fn#3(dot_general)"``; ``"a/b"`` through an
    inlined call); it is provenance for reports, not semantics, so it takes no part in equality.
    """

    opcode: str
    operands: tuple[Value, ...]
    results: tuple[Value, ...]
    attrs: tuple[tuple[str, Attr], ...] = ()
    loc: str = field(default="", compare=False)

    @staticmethod
    def make(opcode: str, operands: Any = (), results: Any = (), **attrs: Any) -> Op:
        """Builds an op, freezing lists into tuples and sorting attributes."""
        frozen = tuple(sorted((k, _freeze_attr(v)) for k, v in attrs.items()))
        return Op(opcode, tuple(operands), tuple(results), frozen)

    @property
    def attr_dict(self) -> dict[str, Attr]:
        return dict(self.attrs)

    def attr(self, key: str, default: Any = None) -> Any:
        for k, v in self.attrs:
            if k == key:
                return v
        return default

    @property
    def result(self) -> Value:
        if len(self.results) != 1:
            raise ValueError(f"op {self.opcode!r} has {len(self.results)} results, not one")
        return self.results[0]

    def with_operands(self, operands: tuple[Value, ...]) -> Op:
        return Op(self.opcode, tuple(operands), self.results, self.attrs, self.loc)


@dataclass(frozen=True)
class Function:
    """A function: parameters, ops in a valid (topological) order, and returned values."""

    name: str
    params: tuple[Value, ...]
    ops: tuple[Op, ...]
    returns: tuple[Value, ...]

    @property
    def param_types(self) -> tuple[TensorType, ...]:
        return tuple(p.type for p in self.params)

    @property
    def result_types(self) -> tuple[TensorType, ...]:
        return tuple(r.type for r in self.returns)

    def producers(self) -> dict[str, Op]:
        """Maps each op-defined value name to the op defining it."""
        return {r.name: op for op in self.ops for r in op.results}

    def uses(self) -> dict[str, int]:
        """How often each value name is used (by ops and by the return)."""
        counts: dict[str, int] = {}
        for op in self.ops:
            for v in op.operands:
                counts[v.name] = counts.get(v.name, 0) + 1
        for v in self.returns:
            counts[v.name] = counts.get(v.name, 0) + 1
        return counts


@dataclass(frozen=True)
class Module:
    """Functions; the first is the entry point.

    ``externals`` holds what the IR refers to but cannot spell (the JAX equations behind opaque ops);
    it does not take part in equality, so a module printed and parsed back compares equal.
    """

    functions: tuple[Function, ...]
    externals: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def entry(self) -> Function:
        return self.functions[0]

    def function(self, name: str) -> Function:
        for f in self.functions:
            if f.name == name:
                return f
        raise KeyError(f"no function @{name} in module")

    def replace_functions(self, functions: tuple[Function, ...] | list[Function]) -> Module:
        return Module(tuple(functions), self.externals)

    def all_ops(self) -> Iterator[Op]:
        for f in self.functions:
            yield from f.ops
