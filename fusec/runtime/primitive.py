"""``fusec_kernel``: the JAX primitive every generated kernel is bound through.

Abstract evaluation comes from the kernel's signature; lowering is the generated kernel (on
``cuda`` always GPU-tiled Triton kernels, even when a CPU machine traced the program; on ``cpu``
the interpreter); batching binds the primitive again with the kernel under ``vmap`` (Pallas adds
a grid axis), so a batched kernel still lowers per platform; the JVP differentiates the kernel's
reference (its ops run by XLA), so ``jax.jvp``/``jax.grad`` of a bare kernel work too; an
attention kernel's JVP is linear in a primitive whose transpose runs fused backward kernels
(:mod:`fusec.runtime.attention_vjp`).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import jax
import jax.extend.core as jcore
from jax.interpreters import ad, batching, mlir

from fusec.codegen.kernel_spec import KernelSpec
from fusec.codegen.xla import numpy_dtype
from fusec.errors import FusecError
from fusec.runtime.attention_vjp import attention_jvp, register_kernel_call
from fusec.runtime.jax_internals import (
    gpu_lowering_target,
    kernel_result_aval,
    relaxed_float_atomics,
    without_manual_axes,
    without_vma_checks,
)

fusec_kernel_p = jcore.Primitive("fusec_kernel")
fusec_kernel_p.multiple_results = True


def call_kernel(spec: KernelSpec, args: list[Any]) -> list[Any]:
    """Binds the kernel primitive (what the Pallas backend calls for every kernel op)."""
    return fusec_kernel_p.bind(*args, spec=spec)


def _abstract_eval(*avals: Any, spec: KernelSpec) -> list[Any]:
    # Inside shard_map (check_vma=True) results vary over every manual axis some input varies over.
    return [kernel_result_aval(t.shape, numpy_dtype(t.elem), avals) for t in spec.out_types]


def _impl(*args: Any, spec: KernelSpec) -> list[Any]:
    return jax.jit(functools.partial(call_kernel, spec))(list(args))


@functools.lru_cache(maxsize=4096)
def _kernel_function(spec: KernelSpec, platform: str) -> Any:
    """The kernel as a jitted function, one per kernel and platform: a kernel bound at several
    places (repeated layers) is traced once and lowered once, as one function the program calls."""
    # Lowering for cuda always gets GPU tiles and Triton kernels, whatever machine traced the
    # program and whatever ``interpret`` said (it decides what runs on a CPU).
    gpu = spec.for_gpu() if platform == "cuda" else None
    if gpu is not None and gpu.backend == "triton":
        gpu = _pallas_if_no_jax_triton(gpu)
    run = functools.partial(gpu.run, interpret=False) if gpu is not None else \
        functools.partial(spec.run, interpret=True)
    return jax.jit(lambda *args: list(run(*args)))


def _pallas_if_no_jax_triton(gpu: KernelSpec) -> KernelSpec | None:
    """A Triton-backend GPU kernel, or, where the installed jax-triton cannot lower it
    (:func:`triton_backend_problem`), the same tile program as a Pallas kernel, with a warning
    saying why (the report says it too): never a crash, never a silent switch."""
    from fusec.runtime.triton_call import triton_backend_problem

    problem = triton_backend_problem()
    if problem is None or gpu.op is None or gpu.module is None:
        return gpu
    from fusec.codegen import pallas

    warnings.warn(f"fusec: kernel {gpu.name} lowers for cuda as a Pallas kernel: {problem}", stacklevel=2)
    try:
        return pallas.build_kernel(gpu.op, gpu.module, False)
    except FusecError:
        return None


def _lowering(ctx: Any, *args: Any, spec: KernelSpec, platform: str) -> Any:
    with warnings.catch_warnings(), without_vma_checks(), gpu_lowering_target(platform), relaxed_float_atomics():
        # JAX 0.11 deprecates Pallas's Triton lowering on every use; fusec chose it deliberately
        # (see the README), and a warning per kernel per compile would tell users nothing.
        warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")
        lowered = mlir.lower_fun(_kernel_function(spec, platform), multiple_results=True)
        return lowered(without_manual_axes(ctx), *args)


@functools.lru_cache(maxsize=1024)
def _batched(spec: KernelSpec, in_axes: tuple[int | None, ...], size: int) -> KernelSpec:
    """``spec`` under ``vmap`` (its GPU twin too), as a kernel of its own."""

    def run(*args: Any, interpret: bool = False) -> list[Any]:
        return list(jax.vmap(functools.partial(spec.run, interpret=interpret), in_axes=list(in_axes))(*args))

    def reference(*args: Any) -> list[Any]:
        return list(jax.vmap(spec.reference, in_axes=list(in_axes))(*args))

    def gpu_builder() -> KernelSpec | None:
        gpu = spec.for_gpu()
        return None if gpu is None else _batched(gpu, in_axes, size)

    return dataclasses.replace(
        spec, run=run, reference=reference, out_types=tuple(t.with_shape((size, *t.shape)) for t in spec.out_types),
        gpu_builder=gpu_builder if spec.interpret else None, _gpu=[], batched=(spec, in_axes, size),
        grad_builder=None, _grad=[])


def _batch(args: list[Any], dims: list[Any], *, spec: KernelSpec) -> tuple[list[Any], list[int]]:
    in_axes = tuple(d if isinstance(d, int) else None for d in dims)
    size = next(a.shape[d] for a, d in zip(args, in_axes) if d is not None)
    outs = fusec_kernel_p.bind(*args, spec=_batched(spec, in_axes, size))
    return list(outs), [0] * len(outs)


def _jvp(primals: list[Any], tangents: list[Any], *, spec: KernelSpec) -> tuple[list[Any], list[Any]]:
    if spec.grad_builder is not None:  # an attention kernel: fused backward kernels under grad
        fused = attention_jvp(spec, primals, tangents)
        if fused is not None:
            return fused
    outs = fusec_kernel_p.bind(*primals, spec=spec)
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    _, tangents_out = jax.jvp(lambda *a: tuple(spec.reference(*a)), tuple(primals), tuple(tangents))
    return outs, list(tangents_out)


fusec_kernel_p.def_impl(_impl)
fusec_kernel_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(fusec_kernel_p, functools.partial(_lowering, platform="cpu"), platform="cpu")
mlir.register_lowering(fusec_kernel_p, functools.partial(_lowering, platform="cuda"), platform="cuda")
batching.primitive_batchers[fusec_kernel_p] = _batch
ad.primitive_jvps[fusec_kernel_p] = _jvp
register_kernel_call(call_kernel)
