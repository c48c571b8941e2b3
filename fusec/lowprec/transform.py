"""The input transform of a quantized matrix in JAX (see :mod:`rotate`): the ``fusec_input_transform``
primitive that ``QuantizedArray.dequantize`` binds on the decoded values, W = T . deq(Q) along the
weight's contracted axis (T = diag(scale) . diag(signs_K) . B, the signs a fixed function of K),
and the x-side form x T that fused programs run instead.

The frontend lowers the primitive to the IR op ``input_transform`` (side "weight"); the pass
``fold-input-transforms`` turns ``dot(x, T . D)`` into ``dot(x T, D)`` (side "input"), so the
low-bit kernel reads deq(Q) directly. Both sides compute in float32 (float64 inputs in float64).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
from jax import lax
from jax.interpreters import ad, batching, mlir

from fusec.lowprec.rotate import hadamard, rotation_signs


def _along(v: Any, rank: int, axis: int) -> Any:
    """A [K] vector shaped to broadcast along ``axis`` of a rank-``rank`` array."""
    shape = [1] * rank
    shape[axis] = v.shape[0]
    return v.reshape(shape)


def _blocks(x: Any, block: int, axis: int) -> Any:
    """The block-Hadamard matrix applied along ``axis`` (it is symmetric: either side alike)."""
    if block == 0:
        return x
    k = x.shape[axis]
    split = x.reshape(x.shape[:axis] + (k // block, block) + x.shape[axis + 1:])
    h = jnp.asarray(hadamard(block), x.dtype)
    out = jnp.tensordot(split, h, axes=[[axis + 1], [0]], precision=lax.Precision.HIGHEST)
    return jnp.moveaxis(out, -1, axis + 1).reshape(x.shape)


def apply_transform(x: Any, scale: Any | None, *, block: int, axis: int, side: str) -> Any:
    """Side "weight": T @ w along ``axis`` of w (the weight the stored one stands for); side
    "input": x @ T along ``axis`` of x (what a matmul's other operand becomes)."""
    dtype = x.dtype
    work = jnp.float64 if dtype == jnp.float64 else jnp.float32
    y = x.astype(work)
    if block:  # the rotation's fixed signs, folded into the scale
        signs = jnp.asarray(rotation_signs(x.shape[axis]), work)
        scale = signs if scale is None else scale.astype(work) * signs
    if scale is not None and side == "input":
        y = y * _along(scale.astype(work), y.ndim, axis)
    y = _blocks(y, block, axis)
    if scale is not None and side == "weight":
        y = y * _along(scale.astype(work), y.ndim, axis)
    return y.astype(dtype)


transform_p = jcore.Primitive("fusec_input_transform")


def _impl(x: Any, *scale: Any, block: int, axis: int) -> Any:
    return apply_transform(x, scale[0] if scale else None, block=block, axis=axis, side="weight")


def _batch(args: list[Any], dims: list[Any], **params: Any) -> tuple[Any, int]:
    in_axes = [d if isinstance(d, int) else None for d in dims]
    return jax.vmap(functools.partial(_impl, **params), in_axes=in_axes)(*args), 0


def _jvp(primals: list[Any], tangents: list[Any], **params: Any) -> tuple[Any, Any]:
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    return jax.jvp(functools.partial(_impl, **params), tuple(primals), tuple(tangents))


transform_p.def_impl(lambda *a, **p: jax.jit(functools.partial(_impl, **p))(*a))
transform_p.def_abstract_eval(lambda x, *vecs, **p: jax.core.ShapedArray(x.shape, x.dtype))
mlir.register_lowering(transform_p, mlir.lower_fun(_impl, multiple_results=False))
batching.primitive_batchers[transform_p] = _batch
ad.primitive_jvps[transform_p] = _jvp


def bind_transform(values: Any, scale: Any | None, block: int, axis: int) -> Any:
    """T applied to the decoded weight ``values`` along ``axis`` (its contracted axis)."""
    if block == 0 and scale is None:
        return values
    return transform_p.bind(values, *([] if scale is None else [scale]), block=block, axis=axis)
