"""The GPU this process would run kernels on, by name (the autotune cache's device key)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from fusec.errors import FusecError
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


def gpu_builder_for(build: Callable[[Op, Module, bool], Any], op: Op, module: Module) -> Callable[[], Any]:
    """A kernel spec's ``gpu_builder``: ``build`` (a backend's ``build_kernel``) on the op's GPU
    tiling; None when a folded view those blocks cannot address (lowering keeps the interpreter)."""

    def gpu_builder() -> Any:
        try:
            return build(gpu_tiled_op(op, module), module, False)
        except FusecError:
            return None

    return gpu_builder


def commented_program(text: str) -> str:
    """A tile program's text as comment lines: what heads a kernel's generated source."""
    return "".join(f"# {line}\n".replace("# \n", "#\n") for line in text.splitlines()) + "\n"
