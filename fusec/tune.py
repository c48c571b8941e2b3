"""``fusec.tune.tune_function``: autotune every matmul kernel of a function at given arguments.

Each kernel's candidates (:func:`fusec.passes.tune_space.candidates`) are ranked by the static
sm_90 model (compiled for sm_90 on this machine, any machine); on a GPU (``method="gpu"``, the
default where there is one) the model's ``top`` best are then timed on the device. Winners are
stored in the autotune cache, where GPU tiling of the same kernel finds them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from fusec.codegen.device import gpu_device_name
from fusec.passes.tiling import Tile
from fusec.passes.tune_space import TileConfig
from fusec.pipeline import resolve_pipeline
from fusec.runtime.autotune import (
    TunableKernel,
    TuneResult,
    model_timer,
    store_result,
    tunable_kernels,
    tune,
    wall_timer,
)


def _passes(config: TileConfig | None, only: str, device: str) -> list[Any]:
    """The Pallas GPU pipeline, the tile pass given ``config`` for the kernel ``only`` (and the
    default tiling, not the cache's, for every other kernel)."""
    out = []
    for p in resolve_pipeline(None, "pallas", interpret=False, device=device):
        if isinstance(p, Tile):
            p = dataclasses.replace(p, config=config.label if config else "", only=only, tuned=False)
        out.append(p)
    return out


def tune_function(fn: Callable[..., Any], *args: Any, method: str = "auto", gpu: str = "h100", top: int = 4,
                  limit: int = 16, store: bool = True, path: Any = None) -> list[TuneResult]:
    """Tunes the matmul kernels of ``fn(*args)`` (arrays, or ``jax.ShapeDtypeStruct``s for
    ``method="model"``). ``method``: "model" (the static model only), "gpu" (model-pruned, then
    timed on the GPU) or "auto" (gpu where there is one); ``gpu``: the modeled GPU ("h100"/"h200");
    ``store``: write winners to the cache (``path``, default the user's)."""
    import fusec

    if method == "auto":
        method = "gpu" if gpu_device_name() else "model"
    if method not in ("model", "gpu"):
        raise ValueError(f"tune_function: method must be 'auto', 'model' or 'gpu', got {method!r}")
    device = gpu_device_name() if method == "gpu" else ""
    if method == "gpu" and not device:
        raise ValueError("tune_function: method='gpu' needs a GPU; this process sees none")

    def program(config: TileConfig | None, only: str = "") -> Any:
        return fusec.jit(fn, backend="pallas", interpret=False, passes=_passes(config, only, device))

    results = []
    for kernel in tunable_kernels(program(None).lower(*args).program.module):
        relower = lambda c, k=kernel: program(c, k.fingerprint).lower(*args)  # noqa: E731
        timer = None
        if method == "gpu":
            timer = wall_timer(lambda c, k=kernel: _runner(program(c, k.fingerprint), args))
        result = tune(kernel, kernel.candidates(limit), timer, model_timer(kernel, relower, gpu), top,
                      baseline=kernel.default)
        if store:
            store_result(result, device, path)
        results.append(result)
    return results


def _runner(fused: Any, args: tuple[Any, ...]) -> Callable[[], Any]:
    return lambda: jax.block_until_ready(fused(*args))


__all__ = ["TunableKernel", "TuneResult", "tune_function"]
