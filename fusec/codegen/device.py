"""The GPU this process would run kernels on, by name (the autotune cache's device key)."""

from __future__ import annotations

import functools

from fusec.ir import Module, Op
from fusec.passes.tiling import tile_kernel_op, tuned_config


@functools.lru_cache(maxsize=1)
def gpu_device_name() -> str:
    """The first NVIDIA GPU's ``device_kind`` (e.g. "NVIDIA H200"), or "" without one (then tuned
    configs are the static model's, keyed by ``fusec.passes.tune_cache.MODEL_DEVICE``)."""
    import jax

    try:
        return next((d.device_kind for d in jax.devices() if d.platform == "gpu"), "")
    except RuntimeError:
        return ""


def gpu_tiled_op(op: Op, module: Module) -> Op:
    """A kernel op (tiled for whatever target) tiled for a GPU: the autotuner's config for it on
    this process's GPU (its cache, then the shipped file), else the default tiling."""
    functions = {f.name: f for f in module.functions}
    found = tuned_config(op, functions, gpu_device_name())
    return tile_kernel_op(op, functions, "gpu", *found) if found else tile_kernel_op(op, functions, "gpu")
