"""``fusec.jit``: ``jax.jit``'s calling conventions, with fusec compiling the traced program.

The function is wrapped in a real ``jax.jit``, so argument checking, static arguments, donation,
pytrees and the compile cache behave exactly as JAX users know them. While ``jax.jit`` traces,
fusec traces the user's function to a jaxpr, runs its pipeline, and evaluates the generated code on
the tracers; XLA compiles the result.
"""

from __future__ import annotations

import functools
import inspect as _inspect_module
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from fusec.codegen import check_backend, has_gpu
from fusec.codegen.device import gpu_device_name
from fusec.lowprec import dequantize
from fusec.passes import Pass
from fusec.pipeline import resolve_pipeline
from fusec.runtime import Fallback, Program, build_program
from fusec.runtime.jax_internals import abstract_struct, varying_axes

PassSpec = str | Sequence[str | Pass] | None


class Lowered:
    """What ``FusecFunction.lower`` returns: the program fusec built for one set of arguments."""

    def __init__(self, program: Program, jax_traced: Any, trace_seconds: float = 0.0, built: bool = True) -> None:
        self.program = program
        self._jax_traced = jax_traced
        self._trace_seconds = trace_seconds
        self._built = built  # False: the program came from fusec's cache, built by an earlier call

    @property
    def jax_traced(self) -> Any:
        """The whole program as ``jax.jit`` traced it (``jax.stages.Traced``: ``.lower()``, ``.jaxpr``)."""
        return self._jax_traced

    @property
    def timings(self) -> dict[str, float]:
        """Seconds spent building this program: ``trace`` (the user's function to a jaxpr),
        ``frontend``, ``passes`` (all of them; ``program.stage_seconds`` has each), ``codegen`` (kernel
        sources), and ``emit`` (the rest of ``jax.jit``'s trace: running the generated code on tracers,
        which is where Pallas traces each kernel body). XLA's lowering and compile come after. When
        the program came from fusec's cache (an earlier call built it), only ``emit`` took time."""
        if not self._built:
            return {"trace": 0.0, "frontend": 0.0, "codegen": 0.0, "passes": 0.0, "emit": self._trace_seconds}
        stages = dict(self.program.stage_seconds)
        out = {"trace": stages.pop("trace", 0.0), "frontend": stages.pop("frontend", 0.0),
               "codegen": stages.pop("codegen", 0.0)}
        out["passes"] = sum(seconds for stage, seconds in self.program.stage_seconds if stage in stages)
        out["emit"] = max(self._trace_seconds - sum(out.values()), 0.0)
        return out

    @property
    def stages(self) -> tuple[str, ...]:
        """Stage names: ``input`` (the frontend's IR), then one per pass."""
        return self.program.stage_names

    def as_text(self, stage: str = "final") -> str:
        """The IR text after ``stage`` (a pass name, ``input`` or ``final``)."""
        return self.program.as_text(stage)

    @property
    def jaxpr(self) -> Any:
        return self.program.jaxpr

    @property
    def fallbacks(self) -> tuple[Fallback, ...]:
        return self.program.fallbacks

    @property
    def kernel_sources(self) -> dict[str, str]:
        """The generated Python source of each kernel, by kernel name."""
        return {name: spec.source for name, spec in self.program.kernels.items()}

    def lower_for(self, platform: str = "cuda") -> Any:
        """The whole program lowered for ``platform`` (works on a CPU machine for ``cuda``)."""
        return self._jax_traced.lower(lowering_platforms=(platform,))

    def gpu_resources(self, arch: int = 90) -> list[Any]:
        """Compiles every kernel to a cubin for ``sm_{arch}`` and returns registers and spills
        (:class:`fusec.runtime.gpu_compile.KernelResources`). Lowering for cuda always gives
        GPU-tiled kernels, so this needs only the ``triton`` package, not a GPU."""
        from fusec.runtime.gpu_compile import compile_kernels
        return compile_kernels(self.lower_for("cuda"), arch)

    def gpu_profile(self, arch: int = 90, gpu: str = "h100") -> Any:
        """The static performance report of every kernel (:class:`fusec.gpu_profile.GpuProfile`):
        compiled for ``sm_{arch}`` on any machine, its SASS read and modeled on ``gpu`` ("h100" or
        "h200"; docs/gpu-model.md). Needs the ``triton`` package and its ``nvdisasm``, not a GPU."""
        from fusec.gpu_profile import build_gpu_profile
        return build_gpu_profile(self, arch, gpu)

    def compile(self) -> Any:
        """The XLA-compiled executable of the whole program (``jax.stages.Compiled``)."""
        return self._jax_traced.lower().compile()


# jax.jit keywords fusec passes on unchanged (those this JAX's jax.jit takes); ``backend`` is fusec's
# own codegen backend, so jax.jit's platform ``backend`` is spelled ``jax_backend``.
_FUSEC_OPTIONS = ("backend", "passes", "verify", "interpret", "jax_backend")


def jax_jit_keywords() -> frozenset[str]:
    """The keyword arguments this JAX's ``jax.jit`` accepts."""
    return frozenset(n for n, p in _inspect_module.signature(jax.jit).parameters.items() if p.kind is p.KEYWORD_ONLY)


def jax_jit_options(options: dict[str, Any], jax_backend: str | None) -> dict[str, Any]:
    """The keywords for the ``jax.jit`` that wraps the program; a TypeError names any it lacks."""
    known = jax_jit_keywords()
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"fusec.jit got unexpected keyword argument(s) {', '.join(map(repr, unknown))}: not a "
                        f"fusec option ({', '.join(_FUSEC_OPTIONS)}) nor a keyword of this JAX's jax.jit "
                        f"({', '.join(sorted(known - {'backend'}))})")
    out = dict(options)
    if jax_backend is not None:
        out["backend"] = jax_backend
    return out


def _abstract_key(leaf: Any) -> Any:
    aval = jax.typeof(leaf)
    return (tuple(aval.shape), str(aval.dtype), bool(getattr(aval, "weak_type", False)),
            tuple(sorted(map(str, varying_axes(aval)))))


class FusecFunction:
    """A function compiled by fusec; call it like the original."""

    def __init__(self, fun: Callable[..., Any], *, backend: str = "auto", passes: PassSpec = None,
                 verify: bool = True, interpret: bool | None = None, jax_backend: str | None = None,
                 **jax_options: Any) -> None:
        if not callable(fun):
            raise TypeError(f"fusec.jit expected a callable, got {fun!r}")
        self._fun = fun
        self._backend = check_backend(backend)
        # Pallas kernels run in interpret mode when asked, or where there is no GPU to run them on.
        self._interpret = bool(interpret) if interpret is not None else not has_gpu()
        device = gpu_device_name() if self._backend in ("pallas", "triton") and not self._interpret else ""
        self._passes = resolve_pipeline(passes, self._backend, self._interpret, device)
        self._verify = verify
        self._programs: dict[Any, tuple[Program, Any]] = {}  # signature -> (program, output treedef)
        self._lock = threading.Lock()
        self._capture = threading.local()
        self._jax_options = jax_jit_options(jax_options, jax_backend)
        impl = functools.wraps(fun)(lambda *a, **k: self._traced(*a, **k))
        self._jitted = jax.jit(impl, **self._jax_options)
        functools.update_wrapper(self, fun)

    # -- calling ---------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._jitted(*args, **kwargs)

    def _traced(self, *args: Any, **kwargs: Any) -> Any:
        # Runs while jax.jit traces: dynamic leaves are tracers, static ones plain Python values.
        leaves, treedef = jax.tree.flatten((args, kwargs))
        dynamic = [i for i, x in enumerate(leaves) if isinstance(x, jax.core.Tracer)]
        program, out_tree = self._program_for(leaves, treedef, dynamic)
        dyn = [leaves[i] for i in dynamic]
        outs = program(program.jaxpr.consts, dyn)
        result = jax.tree.unflatten(out_tree, outs)
        if getattr(self._capture, "programs", None) is not None:
            self._capture.programs.append(program)
        return result

    def _program_for(self, leaves: list[Any], treedef: Any, dynamic: list[int]) -> tuple[Program, Any]:
        dynamic_set = set(dynamic)
        marks = [("dyn", _abstract_key(x)) if i in dynamic_set else ("static", x) for i, x in enumerate(leaves)]
        key: Any = (treedef, tuple(marks))
        try:
            hash(key)
        except TypeError:
            key = None  # a static leaf that cannot be hashed: compile without caching
        if key is not None:
            with self._lock:
                hit = self._programs.get(key)
            if hit is not None:
                return hit
        entry = self._build(leaves, treedef, dynamic)
        if getattr(self._capture, "built", None) is not None:
            self._capture.built.append(entry[0])
        if key is not None:
            with self._lock:
                self._programs[key] = entry
        return entry

    def _build(self, leaves: list[Any], treedef: Any, dynamic: list[int]) -> tuple[Program, Any]:
        def flat_fun(*dyn: Any) -> Any:
            full = list(leaves)
            for i, x in zip(dynamic, dyn):
                full[i] = x
            args, kwargs = jax.tree.unflatten(treedef, full)
            # Quantized weights reach the user's code as float arrays, dequantized by fusec's primitive.
            args, kwargs = dequantize((args, kwargs))
            return self._fun(*args, **kwargs)

        structs = [abstract_struct(leaves[i]) for i in dynamic]
        t0 = time.perf_counter()
        closed, out_shape = jax.make_jaxpr(flat_fun, return_shape=True)(*structs)
        trace_seconds = time.perf_counter() - t0
        name = getattr(self._fun, "__name__", "main")
        program = build_program(closed, name, self._passes, self._backend, self._verify, self._interpret,
                                trace_seconds=trace_seconds)
        return program, jax.tree.structure(out_shape)

    # -- looking inside --------------------------------------------------------------------------
    def lower(self, *args: Any, **kwargs: Any) -> Lowered:
        """Traces for these arguments (arrays or ``jax.ShapeDtypeStruct``) and returns the program."""
        # A fresh jax.jit wrapper so JAX's own trace cache cannot skip fusec's tracing step.
        fresh = jax.jit(functools.wraps(self._fun)(lambda *a, **k: self._traced(*a, **k)), **self._jax_options)
        self._capture.programs, self._capture.built = [], []
        try:
            t0 = time.perf_counter()
            traced = fresh.trace(*args, **kwargs)
            seconds = time.perf_counter() - t0
            programs, built = self._capture.programs, self._capture.built
        finally:
            self._capture.programs = self._capture.built = None
        return Lowered(programs[-1], traced, seconds, built=any(p is programs[-1] for p in built))

    def inspect(self, *args: Any, gpu: str = "h100", **kwargs: Any) -> Any:
        """The :class:`fusec.report.Report` for these arguments, modeled on ``gpu``."""
        from fusec.report import build_report
        return build_report(self.lower(*args, **kwargs), gpu)

    def cache_size(self) -> int:
        """How many distinct signatures fusec has compiled for."""
        return len(self._programs)

    def __repr__(self) -> str:
        return f"<fusec.jit of {getattr(self._fun, '__qualname__', self._fun)!r}>"


# The custom-call targets fusec's GPU kernels lower to (Pallas's Triton lowering); jax.export
# accepts them only when told to, since XLA gives them no compatibility guarantee.
GPU_CUSTOM_CALLS: tuple[str, ...] = ("__gpu$xla.gpu.triton",)


def export_disabled_checks() -> list[Any]:
    """What ``jax.export.export(..., platforms=("cuda",), disabled_checks=...)`` needs for fusec's
    GPU kernels: ``DisabledSafetyCheck.custom_call`` for each of :data:`GPU_CUSTOM_CALLS`."""
    return [jax.export.DisabledSafetyCheck.custom_call(t) for t in GPU_CUSTOM_CALLS]


def inspect(fun: Callable[..., Any], *args: Any, gpu: str = "h100", **options: Any) -> Any:
    """``fusec.jit(fun, **options).inspect(*args, gpu=gpu)``: what fusec makes of ``fun``."""
    return FusecFunction(fun, **options).inspect(*args, gpu=gpu)


def jit(fun: Callable[..., Any] | None = None, **options: Any) -> Any:
    """Compiles ``fun`` with fusec; works as ``fusec.jit(f, ...)``, ``@fusec.jit`` and
    ``@fusec.jit(backend=...)``. fusec's options: ``backend`` (fusec's code generator: "auto":
    Pallas kernels with a GPU, else the reference; "xla"; "pallas"; "triton" is not built yet);
    ``interpret`` (run Pallas kernels in interpret mode; the default where no GPU is present);
    ``passes`` (a pipeline string or list; default :func:`fusec.pipeline.resolve_pipeline`);
    ``verify`` (check the IR after every pass); ``jax_backend`` (``jax.jit``'s own ``backend=``,
    the platform to run on). Every other keyword of this JAX's ``jax.jit`` (``in_shardings``,
    ``out_shardings``, ``static_argnums``/``static_argnames``, ``donate_argnums``/``donate_argnames``,
    ``keep_unused``, ``device``, ``inline``, ``compiler_options``, ...) goes to the ``jax.jit`` that
    wraps fusec's program; any other keyword is a TypeError naming it."""
    if fun is None:
        return lambda f: FusecFunction(f, **options)
    return FusecFunction(fun, **options)
