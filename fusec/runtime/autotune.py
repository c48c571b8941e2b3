"""The autotuner: picks a matmul kernel's tile config from its candidates by an injectable timer.

On a GPU the timer runs compiled candidates (few: the static model ranks them first and only the
``top`` best are timed); without one the static model's time (its sm_90 SASS, modeled by
:mod:`fusec.runtime.gpu_model`, docs/gpu-model.md) is the only ranking. The winner goes to the
persistent cache (:mod:`fusec.passes.tune_cache`), where GPU tiling finds it next time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fusec.codegen.pallas_refs import identifier
from fusec.ir import Function, Module, Op
from fusec.passes.tiling import default_tiling, kernel_facts
from fusec.passes.tune_cache import Entry, TuneKey, kernel_key, store
from fusec.passes.tune_space import TileConfig, TilingFacts, candidates, config_of, tuning_fingerprint

Timer = Callable[[TileConfig], float]  # seconds one run of the kernel takes with a config


@dataclass(frozen=True)
class TunableKernel:
    """A matmul kernel op of a program, as the tuner sees it."""

    name: str  # the kernel's callee
    op: Op
    callee: Function
    facts: TilingFacts
    fingerprint: str

    @property
    def default(self) -> TileConfig:
        return config_of(default_tiling(self.facts, "gpu"))

    def key(self, device: str = "") -> TuneKey:
        return kernel_key(self.callee, self.fingerprint, device)

    def candidates(self, limit: int = 16) -> list[TileConfig]:
        return candidates(self.facts, self.default, limit)


def tunable_kernels(module: Module) -> list[TunableKernel]:
    """The matmul kernels of a module's entry function, each kernel (fingerprint) once."""
    functions = {f.name: f for f in module.functions}
    out: dict[str, TunableKernel] = {}
    for op in module.entry.ops:
        if op.opcode != "kernel":
            continue
        facts = kernel_facts(op, functions)
        if facts.tunable:
            fp = tuning_fingerprint(op, functions)
            out.setdefault(fp, TunableKernel(str(op.attr("callee")), op, functions[str(op.attr("callee"))], facts, fp))
    return list(out.values())


@dataclass(frozen=True)
class TuneResult:
    kernel: TunableKernel
    best: TileConfig
    method: str  # "gpu-timed" or "model"
    timed: tuple[tuple[TileConfig, float], ...]  # seconds by the timer (empty for "model")
    modeled: tuple[tuple[TileConfig, float], ...]  # modeled seconds (empty without a model)
    errors: tuple[tuple[TileConfig, str], ...] = ()  # candidates that failed to build or run

    @property
    def best_time_s(self) -> float:
        return dict(self.timed or self.modeled)[self.best]


def _measure(fn: Timer, configs: Sequence[TileConfig], errors: list[tuple[TileConfig, str]]
             ) -> list[tuple[TileConfig, float]]:
    out = []
    for c in configs:
        try:
            t = float(fn(c))
        except Exception as e:  # a candidate that does not compile loses; the others still count
            errors.append((c, f"{type(e).__name__}: {e}"))
            continue
        if math.isfinite(t) and t >= 0:
            out.append((c, t))
        else:
            errors.append((c, f"timer gave {t!r}"))
    return out


def tune(kernel: TunableKernel, configs: Sequence[TileConfig], timer: Timer | None = None,
         model: Timer | None = None, top: int = 4, baseline: TileConfig | None = None) -> TuneResult:
    """The fastest of ``configs`` for ``kernel``: with ``timer``, the least timed of them (of the
    ``model``'s ``top`` best when there is a model that builds them, and ``baseline``, timed too
    for comparison); without one, the ``model``'s best."""
    if not configs:
        raise ValueError(f"tune: no candidate configs for kernel {kernel.name}")
    if timer is None and model is None:
        raise ValueError("tune: give a timer (GPU), a model (static), or both")
    if top < 1:
        raise ValueError(f"tune: top must be positive, got {top}")
    errors: list[tuple[TileConfig, str]] = []
    modeled = sorted(_measure(model, configs, errors), key=lambda ct: ct[1]) if model is not None else []
    if timer is None:
        timed: list[tuple[TileConfig, float]] = []
        ranking = modeled
    else:
        # No model, or one that could not build any candidate (no sm_90 tools here): time them all.
        pool = [c for c, _ in modeled[:top]] if modeled else list(configs)
        if baseline is not None and baseline not in pool:
            pool.append(baseline)
        timed = _measure(timer, pool, errors)
        ranking = sorted(timed, key=lambda ct: ct[1])
    if not ranking:
        detail = "; ".join(f"{c.label}: {e}" for c, e in errors[:3])
        raise RuntimeError(f"tune: every candidate of kernel {kernel.name} failed ({detail})")
    return TuneResult(kernel, ranking[0][0], "model" if timer is None else "gpu-timed", tuple(timed),
                      tuple(modeled), tuple(errors))


def store_result(result: TuneResult, device: str = "", path: Any = None) -> TuneKey:
    """Writes the winner to the user's cache (or ``path``) under the kernel's key on ``device``."""
    key = result.kernel.key(device)
    store(key, Entry(result.best, result.method, result.best_time_s), path)
    return key


def model_timer(kernel: TunableKernel, lower: Callable[[TileConfig], Any], gpu: str = "h100") -> Timer:
    """The static model's time of ``kernel`` with a config. ``lower(config)`` gives the program
    (a ``fusec.Lowered``) with that config on this kernel; its kernel is compiled for sm_90 on
    this machine (no GPU needed), its SASS read and modeled on ``gpu``. A config that spills
    registers raises (the tuner counts it as failed)."""
    from fusec.runtime.gpu_compile import compile_kernel_artifacts
    from fusec.runtime.gpu_model import model, model_gpu
    from fusec.runtime.gpu_work import kernel_work, workspace_bytes

    spec = model_gpu(gpu)

    def modeled_time(config: TileConfig) -> float:
        lowered = lower(config)
        module = lowered.program.module
        functions = {f.name: f for f in module.functions}
        op = next(o for o in module.entry.ops if o.opcode == "kernel" and kernel_facts(o, functions).tunable
                  and tuning_fingerprint(o, functions) == kernel.fingerprint)
        name = "k_" + identifier(str(op.attr("callee")))
        compiled = {ck.name: ck for ck in compile_kernel_artifacts(lowered.lower_for("cuda"), 90, sass=True)}
        tile = module.function(str(op.attr("tile")))
        trips = max([int(o.attr("trips")) for o in tile.ops if o.opcode == "loop"], default=1)
        if compiled[name].resources.spills:  # a config whose registers spill is not one to ship
            raise ValueError(f"{config.label} spills {compiled[name].resources.spills} bytes of registers")
        work, _, _ = kernel_work(compiled[name], trips, int(op.attr("bytes_read")) + int(op.attr("bytes_written")),
                                 spec, workspace_bytes(op, tile))
        return model(work, spec).time_s

    return modeled_time


def wall_timer(run: Callable[[TileConfig], Callable[[], Any]], repeats: int = 20) -> Timer:
    """A GPU timer: ``run(config)`` gives a function running the program once with that config
    (blocking until done); its median over ``repeats`` runs, after one warm-up (the compile)."""

    def timed(config: TileConfig) -> float:
        once = run(config)
        once()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            once()
            samples.append(time.perf_counter() - t0)
        return sorted(samples)[len(samples) // 2]

    return timed
