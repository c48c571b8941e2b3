"""A compiled fusec program: the jaxpr, the IR after every pass, and the runnable result.

Derivatives: the program runs fusec's code forward; its JVP (and so, by JAX's transposition, its
VJP) comes from JAX differentiating the original jaxpr. Custom-derivative rules in the user's code
are therefore honoured exactly as ``jax.jit`` honours them, though fusec inlines their bodies. A
program with attention kernels is differentiated through its kernels instead, where that is the
same derivative (:mod:`fusec.runtime.ad_route`), so ``jax.grad`` runs the fused attention backward.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.extend.core as jcore
from jax.custom_derivatives import SymbolicZero

from fusec.codegen import compile_module
from fusec.frontend import ParamSource, jaxpr_to_module
from fusec.ir import Module, print_module
from fusec.passes import Pass, PassManager
from fusec.pipeline import log_pass
from fusec.runtime.ad_route import NO_ATTENTION, kernel_ad_problem
from fusec.runtime.jax_internals import make_weak
from fusec.runtime.primitive import call_kernel

_WARNED: set[int] = set()


@dataclass(frozen=True)
class Fallback:
    """A primitive fusec left to XLA unchanged, and why."""

    primitive: str
    reason: str


@dataclass(frozen=True)
class Program:
    """Everything fusec made of one function at one abstract signature."""

    jaxpr: Any  # ClosedJaxpr
    stages: tuple[tuple[str, Module], ...]
    stage_seconds: tuple[tuple[str, float], ...]
    param_sources: tuple[ParamSource, ...]
    backend: str
    run_flat: Callable[..., list[Any]]
    kernels: dict[str, Any]  # kernel name -> KernelSpec (generated source included)
    num_eqns: int = 0  # the jaxpr's equations (nested jit bodies once per call site)
    # None: JAX differentiates the program through its kernels; else why it differentiates the
    # original jaxpr (see fusec.runtime.ad_route).
    ad_problem: str | None = NO_ATTENTION

    @property
    def distinct_kernels(self) -> list[Any]:
        """Each kernel once, in order: kernels that are the same code on the same types (repeated
        layers) share one spec, built and lowered once."""
        return list({id(spec): spec for spec in self.kernels.values()}.values())

    @property
    def module(self) -> Module:
        return self.stages[-1][1]

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.stages)

    def module_before(self, stage: str) -> Module:
        """The module as it was before the first run of pass ``stage`` (the last module if none)."""
        for (name, _), (_, previous) in zip(self.stages[1:], self.stages):
            if name == stage:
                return previous
        return self.module

    def module_at(self, stage: str) -> Module:
        for name, module in reversed(self.stages):
            if name == stage:
                return module
        raise ValueError(f"no stage {stage!r}; stages are {', '.join(self.stage_names)} (or 'final')")

    def as_text(self, stage: str = "final") -> str:
        return print_module(self.module if stage == "final" else self.module_at(stage))

    @property
    def fallbacks(self) -> tuple[Fallback, ...]:
        return tuple(Fallback(str(op.attr("primitive")), str(op.attr("reason")))
                     for op in self.module.all_ops() if op.opcode == "opaque")

    def __call__(self, top_consts: Sequence[Any], dyn: Sequence[Any]) -> list[Any]:
        """Runs on the jaxpr's top-level constants and the flat dynamic arguments."""
        outs = list(_differentiable(self, [*top_consts, *dyn])())
        # The IR carries no weak types (canonicalize drops a convert_element_type that only
        # strengthens one as an identity), so each output gets the weak type the jaxpr declares.
        for i, aval in enumerate(self.jaxpr.out_avals):
            want, have = bool(getattr(aval, "weak_type", False)), bool(getattr(jax.typeof(outs[i]), "weak_type", False))
            if want and not have:
                outs[i] = make_weak(outs[i])
            elif have and not want:
                outs[i] = jax.lax.convert_element_type(outs[i], outs[i].dtype)  # strongly typed
        return outs


def _params(program: Program, top_consts: Sequence[Any], dyn: Sequence[Any]) -> list[Any]:
    out = []
    for src in program.param_sources:
        if src.kind == "arg":
            out.append(dyn[src.index])
        elif src.kind == "packed":
            out.append(tuple(dyn[i] for i in src.parts))
        else:
            out.append(top_consts[src.index] if src.index >= 0 else src.value)
    return out


def _has_tangent_type(x: Any) -> bool:
    """False for a value of an extended dtype whose rules name no tangent dtype (JAX never asks
    for one unless it is differentiated, but ``jax.custom_jvp`` asks for every input's)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
        return True
    return hasattr(getattr(dtype, "_rules", None), "tangent_dtype")


def _differentiable(program: Program, xs: Sequence[Any]) -> Callable[..., tuple[Any, ...]]:
    """The program as a function of the inputs in ``xs`` that have tangent types, with a JVP from
    the original jaxpr; the others (extended dtypes without a tangent dtype) are closed over, so
    they stay out of the custom_jvp as they stay out of differentiation under ``jax.jit``."""
    n_consts = len(program.jaxpr.consts)
    diff = [i for i, x in enumerate(xs) if _has_tangent_type(x)]

    def full(ds: Sequence[Any]) -> list[Any]:
        out = list(xs)
        for i, d in zip(diff, ds):
            out[i] = d
        return out

    def fused(*ds: Any) -> tuple[Any, ...]:
        args = full(ds)
        return tuple(program.run_flat(*_params(program, args[:n_consts], args[n_consts:])))

    run = jax.custom_jvp(fused)

    def original(*ds: Any) -> Any:
        args = full(ds)
        closed = jcore.ClosedJaxpr(program.jaxpr.jaxpr, list(args[:n_consts]))
        return tuple(jcore.jaxpr_as_fun(closed)(*args[n_consts:]))

    def run_jvp(primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> tuple[Any, Any]:
        # Inputs with a symbolic zero tangent are closed over, so a kernel sees which of its
        # inputs are differentiated (an attention's bias that is not keeps the fused backward).
        live = [i for i, t in enumerate(tangents) if not isinstance(t, SymbolicZero)]

        def of_live(fn: Callable[..., Any]) -> Callable[..., Any]:
            def f(*d: Any) -> Any:
                ps = list(primals)
                for i, x in zip(live, d):
                    ps[i] = x
                return fn(*ps)
            return f

        args = tuple(primals[i] for i in live), tuple(tangents[i] for i in live)
        if program.ad_problem is None:
            return jax.jvp(of_live(fused), *args)
        if program.ad_problem != NO_ATTENTION and id(program) not in _WARNED:
            _WARNED.add(id(program))
            warnings.warn(f"fusec: the derivative of {program.module.entry.name} is the original jaxpr's (XLA runs "
                          f"its attention backward, [Tq, Tk] matrices and all): {program.ad_problem}", stacklevel=2)
        _, tangents_out = jax.jvp(of_live(original), *args)
        return run(*primals), tangents_out

    run.defjvp(run_jvp, symbolic_zeros=True)

    return lambda: run(*(xs[i] for i in diff))


def build_program(closed: Any, name: str, passes: list[Pass], backend: str, verify: bool = True,
                  interpret: bool = True, trace_seconds: float | None = None) -> Program:
    """Frontend, passes and codegen for one ClosedJaxpr (``trace_seconds``: how long tracing it took,
    recorded first in ``stage_seconds``)."""
    timings: list[tuple[str, float]] = [] if trace_seconds is None else [("trace", trace_seconds)]
    t0 = time.perf_counter()
    front = jaxpr_to_module(closed, name)
    timings.append(("frontend", time.perf_counter() - t0))
    log_pass(name, "frontend", front.module, timings[-1][1])
    last = [time.perf_counter()]

    def on_stage(stage: str, module: Module) -> None:
        now = time.perf_counter()
        if stage != "input":
            timings.append((stage, now - last[0]))
            log_pass(name, stage, module, timings[-1][1])
        last[0] = now

    manager = PassManager(passes, verify=verify, on_stage=on_stage)
    manager.run(front.module)
    t0 = time.perf_counter()
    compiled = compile_module(manager.stages[-1][1], backend, interpret, call_kernel, make_weak)
    timings.append(("codegen", time.perf_counter() - t0))
    log_pass(name, "codegen", manager.stages[-1][1], timings[-1][1])
    stages = tuple(manager.stages)
    return Program(closed, stages, tuple(timings), front.param_sources, backend, compiled.run,
                   compiled.kernels, front.num_eqns, kernel_ad_problem(closed, stages))
