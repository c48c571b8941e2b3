"""Turns a ClosedJaxpr into an IR module.

Nested ``jit`` calls without captured constants become ``call`` ops to functions of the module (the
same jaxpr called twice becomes one function); custom-derivative bodies, remat bodies and nested
jits with constants are inlined; a nested jit's shardings and ``with_sharding_constraint`` become
``sharding_constraint`` ops. Equations without a rule become ``opaque`` ops, kept in
``Module.externals`` by reference, which XLA runs unchanged.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax.extend.core as jcore

from fusec.frontend import rules_math, rules_shape, rules_sharding  # noqa: F401  (register their rules)
from fusec.frontend.rules import RULES, NoRule, literal_value
from fusec.frontend.types import aval_to_type
from fusec.ir import Builder, Function, Module, Op, TensorType, Value, parse_elem_type


@dataclass(frozen=True)
class ParamSource:
    """Where an entry parameter comes from: flat argument ``index``, or a captured constant
    (``index`` is its position in the top-level ClosedJaxpr's consts, or -1 for one captured by a
    nested jaxpr)."""

    kind: str  # "arg" | "const" | "packed"
    index: int
    value: Any = None
    parts: tuple[int, ...] = ()  # "packed": the flat arguments (planes, scales, zero-points) it groups


@dataclass(frozen=True)
class FrontendResult:
    module: Module
    param_sources: tuple[ParamSource, ...]
    num_eqns: int  # equations of the program, nested jit bodies counted once per call site


# Control-flow primitives and the parameters holding their bodies (a ClosedJaxpr or a tuple of them).
CONTROL_FLOW_BODIES: dict[str, tuple[str, ...]] = {
    "scan": ("jaxpr",), "while": ("cond_jaxpr", "body_jaxpr"), "cond": ("branches",),
}


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.$]", "_", name) or "f"


def _has_consts(closed: Any) -> bool:
    """Whether this closed jaxpr, or one nested in it, captures constants."""
    if getattr(closed, "consts", ()):
        return True
    jaxpr = getattr(closed, "jaxpr", closed)
    return any(_has_consts(sub) for eqn in jaxpr.eqns for sub in jcore.jaxprs_in_params(eqn.params))


class Lowerer:
    """State of one conversion: the module's functions, externals, and the function being built."""

    def __init__(self, module_state: _ModuleState, builder: Builder, hoist_consts: bool) -> None:
        self.state = module_state
        self.builder = builder
        self.hoist_consts = hoist_consts
        self.env: dict[Any, Value] = {}
        self.const_sources: list[ParamSource] = []
        self.eqn_count = 0  # equations lowered into this function (inlined bodies' included)
        self.call_sites: list[str] = []  # callee of each call op, for the flattened count

    # -- helpers used by rules -------------------------------------------------------------------
    def reshape(self, v: Value, shape: tuple[int, ...]) -> Value:
        return v if v.type.shape == shape else self.builder.op("reshape", [v], shape=shape)

    def broadcast_to(self, v: Value, shape: tuple[int, ...]) -> Value:
        """``v`` broadcast to ``shape``: a scalar, or a tensor of the same rank with size-1 dimensions."""
        if v.type.shape == shape:
            return v
        dims = () if v.type.rank == 0 else tuple(range(len(shape)))
        return self.builder.op("broadcast", [v], shape=shape, dims=dims)

    def constant(self, value: Any, type_: TensorType) -> Value:
        return self.builder.op("constant", (), value=value, dtype=str(type_.elem), shape=type_.shape)

    def read(self, atom: Any) -> Value:
        if isinstance(atom, jcore.Literal):
            type_ = aval_to_type(atom.aval)
            value = literal_value(atom.val)
            if value is None:
                return self.hoisted_const(atom.val, type_)
            return self.constant(value, type_)
        return self.env[atom]

    def hoisted_const(self, value: Any, type_: TensorType, top_index: int = -1) -> Value:
        scalar = literal_value(value)
        if scalar is not None and type_.size == 1:
            return self.constant(scalar, type_)
        if not self.hoist_consts:
            raise NoRule("captured array constants inside a called function")
        param = self.builder.param(type_, f"const{len(self.const_sources)}")
        self.const_sources.append(ParamSource("const", top_index, value))
        return param

    def inline(self, closed: Any, ins: Sequence[Value], top: bool = False) -> list[Value]:
        """Converts ``closed`` (a ClosedJaxpr or Jaxpr) in place, with ``ins`` as its inputs;
        ``top`` marks the program's own jaxpr, whose constants are tracked by index."""
        jaxpr = getattr(closed, "jaxpr", closed)
        consts = getattr(closed, "consts", ())
        saved = self.env
        self.env = {}
        try:
            for j, (var, c) in enumerate(zip(jaxpr.constvars, consts)):
                self.env[var] = self.hoisted_const(c, aval_to_type(var.aval), j if top else -1)
            for var, v in zip(jaxpr.invars, ins):
                self.env[var] = v
            for eqn in jaxpr.eqns:
                self.lower_eqn(eqn)
            return [self.read(v) for v in jaxpr.outvars]
        finally:
            self.env = saved

    def call_or_inline(self, closed: Any, ins: Sequence[Value], name: str) -> list[Value]:
        if _has_consts(closed):
            return self.inline(closed, ins)
        callee = self.state.function_for(closed, name)
        return self.builder.op_multi("call", ins, result_types=callee.result_types, callee=callee.name)

    def constrain(self, v: Value, sharding: Any) -> Value:
        """``v`` under a sharding constraint (the sharding object is kept in the module's externals)."""
        ref = self.state.add_external(sharding, "sharding")
        return self.builder.op("sharding_constraint", [v], ref=ref, spec=str(getattr(sharding, "spec", sharding)))

    # -- the walk --------------------------------------------------------------------------------
    def lower_eqn(self, eqn: Any) -> None:
        """Lowers one equation and stamps its ops with its location (see ``Op.loc``)."""
        first_op, count = len(self.builder.ops), self.eqn_count
        self._lower_eqn(eqn)
        ops = self.builder.ops
        calls = [op for op in ops[first_op:] if op.opcode == "call"]
        if self.eqn_count != count:
            return  # an inlined body: its equations stamped their own ops
        if calls:  # a nested jit: its callee's equations are counted there
            loc = f"{self.builder.name}@{len(self.call_sites)}"
            self.call_sites.extend(str(op.attr("callee")) for op in calls)
        else:
            self.eqn_count += 1
            loc = f"{self.builder.name}#{self.eqn_count}({eqn.primitive.name})"
        for i in range(first_op, len(ops)):
            if not ops[i].loc:
                ops[i] = dataclasses.replace(ops[i], loc=loc)

    def _lower_eqn(self, eqn: Any) -> None:
        ins = [self.read(v) for v in eqn.invars]
        expected = [aval_to_type(v.aval) for v in eqn.outvars]
        rule = RULES.get(eqn.primitive.name)
        mark = (len(self.builder.ops), len(self.builder.params), len(self.const_sources), self.eqn_count,
                len(self.call_sites))
        reason = f"no fusec rule for primitive '{eqn.primitive.name}'"
        if rule is not None:
            try:
                outs = list(rule(self, eqn, ins))
                got = [v.type for v in outs]
                if got == expected:
                    self._bind(eqn, outs)
                    return
                reason = (f"rule for '{eqn.primitive.name}' gave ({', '.join(map(str, got))}), "
                          f"expected ({', '.join(map(str, expected))})")
            except NoRule as e:
                reason = f"'{eqn.primitive.name}': {e}"
            except (ValueError, TypeError, KeyError) as e:
                reason = f"'{eqn.primitive.name}': rule failed: {e}"
            # Roll back whatever the rule emitted, then fall back to XLA.
            del self.builder.ops[mark[0]:]
            del self.builder.params[mark[1]:]
            del self.const_sources[mark[2]:]
            self.eqn_count = mark[3]  # equations of an inlined body that was rolled back
            del self.call_sites[mark[4]:]
        self._bind(eqn, self._opaque(eqn, ins, expected, reason))

    def _opaque(self, eqn: Any, ins: list[Value], types: list[TensorType], reason: str) -> list[Value]:
        ref = self.state.add_external(eqn)
        attrs: dict[str, Any] = {"primitive": eqn.primitive.name, "ref": ref, "reason": reason}
        if eqn.effects:
            attrs["effects"] = True
        bodies = self._bodies(eqn)
        if bodies:
            attrs["bodies"] = bodies
            attrs["reason"] = f"{reason}; its body runs fusec's code"
            if eqn.primitive.name == "scan":
                attrs["trips"] = int(eqn.params["length"])  # the report counts the body this many times
            self.call_sites.extend(bodies)  # the bodies' equations count in the program's
        return self.builder.op_multi("opaque", ins, result_types=types, **attrs)

    def _bodies(self, eqn: Any) -> list[str]:
        """IR functions for the bodies of a loop or conditional (the loop itself stays JAX's), so
        the passes and backends compile them; [] where a body captures constants."""
        prim = eqn.primitive.name
        named = []  # (function name, body): scan_body, while_cond, while_body, cond_branch0, ...
        for p in CONTROL_FLOW_BODIES.get(prim, ()):
            value = eqn.params[p]
            if isinstance(value, tuple):
                named.extend((f"{prim}_branch{i}", c) for i, c in enumerate(value))
            else:
                named.append((f"{prim}_{p.removesuffix('_jaxpr').replace('jaxpr', 'body')}", value))
        if not named or any(_has_consts(c) for _, c in named):
            return []
        return [self.state.function_for(c, name, fresh=True).name for name, c in named]

    def _bind(self, eqn: Any, outs: list[Value]) -> None:
        for var, v in zip(eqn.outvars, outs):
            if not isinstance(var, jcore.DropVar):
                self.env[var] = v


class _ModuleState:
    def __init__(self) -> None:
        self.functions: list[Function] = []
        self.by_jaxpr: dict[int, tuple[Any, Function]] = {}
        self.externals: dict[str, Any] = {}
        self.names: set[str] = set()
        self.eqn_counts: dict[str, tuple[int, tuple[str, ...]]] = {}  # function -> (own, callees)

    def flattened_eqns(self, name: str) -> int:
        own, callees = self.eqn_counts[name]
        return own + sum(self.flattened_eqns(c) for c in callees)

    def unique_name(self, name: str) -> str:
        base, n = _sanitize(name), 0
        candidate = base
        while candidate in self.names:
            n += 1
            candidate = f"{base}_{n}"
        self.names.add(candidate)
        return candidate

    def add_external(self, eqn: Any, kind: str | None = None) -> str:
        """Keeps ``eqn`` (a JAX equation, or any object ``kind`` names) by a fresh reference."""
        ref = f"{_sanitize(kind or eqn.primitive.name)}_{len(self.externals)}"
        self.externals[ref] = eqn
        return ref

    def function_for(self, closed: Any, name: str, fresh: bool = False) -> Function:
        """The IR function for a (const-free) jaxpr; one per distinct jaxpr unless ``fresh``."""
        jaxpr = getattr(closed, "jaxpr", closed)
        hit = self.by_jaxpr.get(id(jaxpr))
        if hit is not None and not fresh:
            return hit[1]
        builder = Builder(self.unique_name(name))
        lowerer = Lowerer(self, builder, hoist_consts=False)
        params = [builder.param(aval_to_type(v.aval), f"a{i}") for i, v in enumerate(jaxpr.invars)]
        func = builder.finish(lowerer.inline(closed, params))
        self.eqn_counts[func.name] = (lowerer.eqn_count, tuple(lowerer.call_sites))
        self.functions.append(func)
        if not fresh:
            self.by_jaxpr[id(jaxpr)] = (jaxpr, func)  # keep jaxpr alive so its id stays unique
        return func


def jaxpr_to_module(closed: Any, name: str = "main") -> FrontendResult:
    """Converts a ClosedJaxpr; the entry function takes captured constants, then the jaxpr's inputs."""
    state = _ModuleState()
    builder = Builder(state.unique_name(name))
    lowerer = Lowerer(state, builder, hoist_consts=True)
    args = [aval_to_type(v.aval) for v in closed.jaxpr.invars]
    # Parameters for the arguments are made first so they are named arg0..; constants follow as found.
    arg_params = [builder.param(t, f"arg{i}") for i, t in enumerate(args)]
    outs = lowerer.inline(closed, arg_params, top=True)
    entry = builder.finish(outs)
    # Order parameters: captured constants first, then the arguments.
    const_params = [p for p in entry.params if p not in arg_params]
    entry = Function(entry.name, tuple(const_params + arg_params), entry.ops, entry.returns)
    sources = tuple(lowerer.const_sources) + tuple(ParamSource("arg", i) for i in range(len(args)))
    entry, sources = fold_packed_arguments(entry, sources)
    state.eqn_counts[entry.name] = (lowerer.eqn_count, tuple(lowerer.call_sites))
    return FrontendResult(Module((entry, *state.functions), state.externals), sources,
                          state.flattened_eqns(entry.name))


def fold_packed_arguments(func: Function, sources: tuple[ParamSource, ...]
                          ) -> tuple[Function, tuple[ParamSource, ...]]:
    """Arguments that are the packed planes, scales and zero-points of one quantized weight, used
    only by its ``dequantize``, become one parameter of the low-bit type (``i3g128[4096,4096]``)."""
    uses = func.uses()
    index = {p.name: i for i, p in enumerate(func.params)}
    params: list[Value | None] = list(func.params)
    new_sources: list[ParamSource | None] = list(sources)
    replaced: dict[int, Op] = {}
    for op in func.ops:
        names = [v.name for v in op.operands]
        if op.opcode != "dequantize" or len(names) < 2 or len(set(names)) != len(names):
            continue
        if not all(n in index and uses.get(n) == 1 and sources[index[n]].kind == "arg" for n in names):
            continue
        packed = Value(names[0], TensorType(parse_elem_type(str(op.attr("format"))), tuple(op.attr("shape"))))
        first = index[names[0]]
        params[first] = packed
        new_sources[first] = ParamSource("packed", -1, parts=tuple(sources[index[n]].index for n in names))
        for n in names[1:]:
            params[index[n]] = new_sources[index[n]] = None
        replaced[id(op)] = Op(op.opcode, (packed,), op.results, op.attrs, op.loc)
    if not replaced:
        return func, sources
    ops = tuple(replaced.get(id(op), op) for op in func.ops)
    return (Function(func.name, tuple(p for p in params if p is not None), ops, func.returns),
            tuple(s for s in new_sources if s is not None))
