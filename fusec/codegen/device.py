"""The GPU this process would run kernels on, by name (the autotune cache's device key)."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def gpu_device_name() -> str:
    """The first NVIDIA GPU's ``device_kind`` (e.g. "NVIDIA H200"), or "" without one (then tuned
    configs are the static model's, keyed by ``fusec.passes.tune_cache.MODEL_DEVICE``)."""
    import jax

    try:
        return next((d.device_kind for d in jax.devices() if d.platform == "gpu"), "")
    except RuntimeError:
        return ""
