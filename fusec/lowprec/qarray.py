"""Quantized parameters for JAX: the ``QuantizedArray`` pytree node, ``quantize``/``dequantize`` on
parameter pytrees, and the ``fusec_dequantize`` primitive that unpacks one in JAX.

``fusec.jit`` dequantizes every ``QuantizedArray`` among its arguments through the primitive before
calling the user's function, so model code written for float weights runs unchanged and fusec sees
exactly where each low-bit weight is used.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad, batching, mlir

from fusec.lowprec.formats import FLOAT_LAYOUTS, Format
from fusec.lowprec.packing import WORD_BITS, default_packing, lane_orders, pack, plane_widths
from fusec.lowprec.quantize import SCALE_DTYPES, QuantizedCodes, quantize_codes
from fusec.lowprec.rotate import InputTransform, check_block
from fusec.lowprec.transform import bind_transform


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: ``bits`` 1..8; ``fmt`` int | uint | fp | nf | lut (``layout`` picks the
    small float for fp, default the one with ``bits`` bits; ``lut`` gives the 2^bits values);
    ``group`` rows per scale along the reduction axis, or None for one per output channel;
    ``scale_dtype`` f32 | bf16 | f16; ``axis`` the axis matmuls contract (0 for ``x @ w`` with
    ``w`` [in, out], as Flax and Haiku store it; 1 for ``x @ w.T`` and ``W @ x`` with ``W``
    [out, in], as Equinox stores it and tied embeddings are used): groups run along it, so the
    fused kernel unpacks the weight in its K loop; ``packing`` the order codes are stored in
    ("planes" or "pairs", fusec/lowprec/packing.py; None: ``default_packing(bits)``, "pairs" for
    3 bits, which the paired GEMV decodes)."""

    bits: int
    group: int | None = 128
    fmt: str = "int"
    layout: str | None = None
    lut: tuple[float, ...] | None = None
    scale_dtype: str = "bf16"
    axis: int = 0
    packing: str | None = None

    def format(self) -> Format:
        layout = self.layout
        if self.fmt == "fp" and layout is None:
            layout = next((name for name, (e, m) in FLOAT_LAYOUTS.items() if 1 + e + m == self.bits), None)
        return Format(self.fmt, self.bits, layout, None if self.lut is None else tuple(float(v) for v in self.lut))


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True)
class QuantizedArray:
    """A weight stored as packed b-bit codes (uint32 planes), scales and zero-points, grouped along
    the axes its matmuls contract (``contract``: axis 1 of a matrix, or leading axes). ``shape`` is
    the weight's own; the codes are laid out [K, N] with K the contracted axes (a matrix transposed
    when ``contract`` is (1,); a 3-D or 4-D weight reshaped); ``packing`` the order of the codes
    in the planes (fusec/lowprec/packing.py).

    A matrix may carry an exact input transform W = T . deq(Q) (:mod:`rotate`), T = diag(``in_scale``)
    . B(``rotate_block``) [K, K] with B block-Hadamard (0: none) and ``in_scale`` a [K] vector or
    None; fused programs compute x @ W as (x T) @ deq(Q)."""

    planes: tuple[Any, ...]
    scales: Any
    zeros: Any | None
    fmt: Format
    group: int
    shape: tuple[int, int]
    dtype: Any  # the dtype dequantization produces
    contract: tuple[int, ...] = (0,)
    packing: str = "planes"
    in_scale: Any | None = None
    rotate_block: int = 0

    def _code_leaves(self) -> tuple[Any, ...]:
        return (*self.planes, self.scales) + ((self.zeros,) if self.zeros is not None else ())

    def tree_flatten(self) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        children = self._code_leaves() + ((self.in_scale,) if self.in_scale is not None else ())
        return children, (len(self.planes), self.zeros is not None, self.fmt, self.group, self.shape,
                          np.dtype(self.dtype).name, self.contract, self.packing, self.in_scale is not None,
                          self.rotate_block)

    @classmethod
    def tree_unflatten(cls, aux: tuple[Any, ...], children: tuple[Any, ...]) -> QuantizedArray:
        n_planes, has_zeros, fmt, group, shape, dtype, contract, packing, has_scale, block = aux
        planes = tuple(children[:n_planes])
        zeros = children[n_planes + 1] if has_zeros else None
        scale = children[n_planes + 1 + int(has_zeros)] if has_scale else None
        return cls(planes, children[n_planes], zeros, fmt, group, shape, jnp.dtype(dtype), contract, packing,
                   scale, block)

    @property
    def transformed(self) -> bool:
        """Whether the weight carries an input transform (a rotation and/or input-channel scale)."""
        return self.in_scale is not None or self.rotate_block != 0

    def __repr__(self) -> str:
        k, n = self.packed_shape
        t = []
        if self.rotate_block:
            t.append(f"hadamard{self.rotate_block}")
        if self.in_scale is not None:
            t.append("in_scale")
        name = f"{self.fmt.family}{self.fmt.bits}g{self.group}" + ("p" if self.packing == "pairs" else "")
        return (f"QuantizedArray({name}, shape={list(self.shape)}, contract={list(self.contract)}"
                + (f", transform={'+'.join(t)}" if t else "") + ")")

    @property
    def packed_shape(self) -> tuple[int, int]:
        """[K, N]: the contracted axis first."""
        return packed_shape(tuple(self.shape), self.contract)

    @property
    def nbytes(self) -> int:
        return int(sum(np.asarray(x).nbytes for x in self.tree_flatten()[0]))

    def dequantize(self) -> jax.Array:
        # A transpose of the [K, N] values: matmuls contracting axis 1 then read [K, N] directly
        # (canonicalize folds the transposes into the dot), so the fused kernel still unpacks them.
        values = dequantize_p.bind(*self._code_leaves(), **_params(self))
        if self.contract == (1,):
            values = values.T
        elif len(self.shape) != 2:
            values = values.reshape(self.shape)
        # The transform acts on the contracted axis as the user's code reads it (W itself, exactly).
        return bind_transform(values, self.in_scale, self.rotate_block, self.contract[0])


def packed_shape(shape: tuple[int, ...], contract: tuple[int, ...]) -> tuple[int, int]:
    """[K, N] of a weight of ``shape`` contracted over ``contract``: a matrix's axis 0 or 1, or
    leading axes of a larger weight. Raises ValueError for any other layout."""
    size = int(np.prod(shape))
    if len(shape) == 2 and contract == (1,):
        return (shape[1], shape[0])
    if len(shape) >= 2 and contract == tuple(range(len(contract))) and 0 < len(contract) < len(shape):
        k = int(np.prod(shape[:len(contract)]))
        return (k, size // k)
    raise ValueError(f"a weight of shape {list(shape)} contracted over axes {list(contract)} has no [K, N] "
                     "layout (axis 1 of a matrix, or leading axes)")


def _params(q: QuantizedArray) -> dict[str, Any]:
    return {"family": q.fmt.family, "bits": q.fmt.bits, "layout": q.fmt.layout, "lut": q.fmt.lut,
            "group": q.group, "shape": q.packed_shape, "dtype": np.dtype(q.dtype).name,
            "has_zeros": q.zeros is not None, "packing": q.packing}


# -- the primitive ------------------------------------------------------------------------------
dequantize_p = jcore.Primitive("fusec_dequantize")


def unpack_codes(planes: list[Any], bits: int, k: int, packing: str = "planes") -> jax.Array:
    """Codes [K, N] (int32) from uint32 planes packed in order ``packing``, with shifts and masks only."""
    out = None
    shift = 0
    for p, word, order in zip(plane_widths(bits), planes, lane_orders(bits, packing)):
        per_word = WORD_BITS // p
        lanes = jnp.asarray(order, jnp.uint32) * jnp.uint32(p)
        parts = (word[:, None, :] >> lanes[None, :, None]) & jnp.uint32(2**p - 1)
        plane = parts.reshape(word.shape[0] * per_word, word.shape[1]) << jnp.uint32(shift)
        out = plane if out is None else out | plane
        shift += p
    assert out is not None
    return out[:k].astype(jnp.int32)


def dequantize_impl(*leaves: Any, family: str, bits: int, layout: str | None, lut: tuple[float, ...] | None,
                    group: int, shape: tuple[int, int], dtype: str, has_zeros: bool,
                    packing: str = "planes") -> jax.Array:
    """The reference decoder: ``layout`` is the small-float layout of an fp format (its number
    format), ``packing`` the order of the codes in the planes (their storage)."""
    n_planes = len(plane_widths(bits))
    planes, scales = list(leaves[:n_planes]), leaves[n_planes]
    k, n = shape
    codes = unpack_codes(planes, bits, k, packing).reshape(k // group, group, n)
    s = scales.astype(jnp.float32)[:, None, :]
    if has_zeros:
        values = (codes.astype(jnp.float32) - leaves[n_planes + 1].astype(jnp.float32)[:, None, :]) * s
    else:
        table = jnp.asarray(np.nan_to_num(Format(family, bits, layout, lut).table), jnp.float32)
        values = table[codes] * s
    return values.reshape(k, n).astype(dtype)


def _abstract(*avals: Any, shape: tuple[int, int], dtype: str, **params: Any) -> Any:
    return jax.core.ShapedArray(shape, jnp.dtype(dtype))


def _batch(args: list[Any], dims: list[Any], **params: Any) -> tuple[Any, int]:
    in_axes = [d if isinstance(d, int) else None for d in dims]
    return jax.vmap(functools.partial(dequantize_impl, **params), in_axes=in_axes)(*args), 0


def _jvp(primals: list[Any], tangents: list[Any], **params: Any) -> tuple[Any, Any]:
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    return jax.jvp(functools.partial(dequantize_impl, **params), tuple(primals), tuple(tangents))


dequantize_p.def_impl(lambda *a, **p: jax.jit(functools.partial(dequantize_impl, **p))(*a))
dequantize_p.def_abstract_eval(_abstract)
mlir.register_lowering(dequantize_p, mlir.lower_fun(dequantize_impl, multiple_results=False))
batching.primitive_batchers[dequantize_p] = _batch
ad.primitive_jvps[dequantize_p] = _jvp


# -- the pytree API -----------------------------------------------------------------------------
def _path_name(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def _quantize_leaf(path: str, w: Any, spec: QuantSpec, contract: tuple[int, ...]) -> QuantizedArray:
    try:
        fmt = spec.format()
        if spec.packing is not None:
            lane_orders(spec.bits, spec.packing)  # a packing the bit width has
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    arr = np.asarray(w)
    if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16"):
        raise ValueError(f"{path}: only float weights can be quantized, got {arr.dtype}")
    if spec.scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"{path}: scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {spec.scale_dtype!r}")
    try:
        k, n = packed_shape(arr.shape, contract)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    matrix = arr.T if contract == (1,) else arr.reshape(k, n)
    try:
        q = quantize_codes(matrix.astype(np.float32), fmt, spec.group, spec.scale_dtype)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return from_codes(q, arr.shape, arr.dtype, contract, packing=spec.packing)


def from_codes(q: QuantizedCodes, shape: tuple[int, ...], dtype: Any, contract: tuple[int, ...],
               transform: InputTransform | None = None, path: str = "the weight",
               packing: str | None = None) -> QuantizedArray:
    """The ``QuantizedArray`` holding codes [K, N] of a weight of ``shape``, packed in order
    ``packing`` (None: ``default_packing``); with ``transform`` (a matrix only) it stands for
    T . deq(codes). Raises ValueError naming ``path``."""
    packing = default_packing(q.fmt.bits) if packing is None else packing
    packed = pack(q.codes, q.fmt.bits, packing)
    scale, block = None, 0
    if transform is not None and not transform.is_identity:
        k = packed_shape(tuple(shape), contract)[0]
        if len(shape) != 2:
            raise ValueError(f"{path}: an input transform needs a matrix, got shape {list(shape)}")
        check_block(k, transform.block, path)
        block = transform.block
        if transform.scale is not None:
            scale = jnp.asarray(transform.scale)
            if scale.shape != (k,):
                raise ValueError(f"{path}: in_scale has shape {list(scale.shape)}, expected [{k}]")
    return QuantizedArray(tuple(jnp.asarray(p) for p in packed.planes), jnp.asarray(q.scales),
                          None if q.zeros is None else jnp.asarray(q.zeros), q.fmt, q.group, tuple(shape),
                          jnp.dtype(dtype), contract, packing, scale, block)


@dataclass(frozen=True)
class LeafPlan:
    """What ``quantize`` does with one leaf: ``quantized``, or the ``reason`` it is left alone."""

    path: str
    quantized: bool
    reason: str  # "" when quantized
    nbytes: int
    contract: tuple[int, ...]  # the axes groups run along


def _contract_of(value: int | tuple[int, ...]) -> tuple[int, ...]:
    return (value,) if isinstance(value, int) else tuple(value)


def _skip_reason(leaf: Any, spec: QuantSpec, contract: tuple[int, ...]) -> str:
    """Why a leaf is not quantized by default ("" if it is)."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not hasattr(leaf, "shape"):
        return "not an array"
    if not jnp.issubdtype(dtype, jnp.floating):
        return f"{jnp.dtype(dtype).name}, not a float weight"
    if leaf.ndim < 2:
        return f"{leaf.ndim}-D; only matrices and larger weights are quantized"
    try:
        k, _ = packed_shape(tuple(leaf.shape), contract)
    except ValueError as e:
        return str(e)
    if spec.group is not None and k % spec.group:
        return f"its contracted size {k} is not a whole number of {spec.group}-row groups"
    return ""


def plan(params: Any, spec: QuantSpec, where: Callable[[str, Any], bool] | None = None,
         axes: Mapping[str, int | tuple[int, ...]] | None = None) -> list[LeafPlan]:
    """Every leaf of ``params`` with what :func:`quantize` does to it and why. With ``axes`` (from
    :func:`fusec.lowprec.contraction_axes`), a leaf no matmul contracts is left float."""
    given = axes is not None
    axes = axes or {}
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = _path_name(path)
        contract = _contract_of(axes.get(name, spec.axis))
        reason = _skip_reason(leaf, spec, contract)
        if given and name not in axes and (not reason or reason.startswith("its contracted")):
            reason = "no matmul contracts it (along one set of axes)"
        if where is not None:
            chosen = where(name, leaf)
            reason = "" if chosen else (reason or "not selected by where")
        size = int(np.asarray(leaf).nbytes) if hasattr(leaf, "dtype") else 0
        out.append(LeafPlan(name, not reason, reason, size, contract))
    return out


def plan_summary(entries: list[LeafPlan]) -> str:
    """A table of :func:`plan`'s decisions with the share of parameter bytes each way."""
    total = max(1, sum(e.nbytes for e in entries))
    done = sum(e.nbytes for e in entries if e.quantized)
    lines = [f"quantized {sum(e.quantized for e in entries)} of {len(entries)} leaves, "
             f"{done / total:.1%} of parameter bytes"]
    lines += [f"  {e.path}: " + (f"quantized along axes {list(e.contract)}" if e.quantized else f"left: {e.reason}")
              for e in entries]
    return "\n".join(lines)


def quantize(params: Any, spec: QuantSpec, where: Callable[[str, Any], bool] | None = None,
             axes: Mapping[str, int | tuple[int, ...]] | None = None) -> Any:
    """``params`` with each selected 2-D float leaf replaced by a :class:`QuantizedArray`.

    ``where(path, leaf)`` selects leaves (default: every float weight of 2 or more dimensions whose
    contracted axes, ``spec.axis`` or ``axes[path]`` (an axis or a tuple of leading axes), hold a
    whole number of groups); paths are written as
    ``jax.tree_util.keystr`` writes them, e.g. ``['layer0']['w']``; :func:`contraction_axes` finds
    each weight's axis from a function using it. :func:`plan` says what is left and why. Every
    selected leaf is checked before any is quantized: a bad spec or weight raises ``ValueError``
    naming the path, and no partial pytree is returned.
    """
    decisions = plan(params, spec, where, axes)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = [_quantize_leaf(d.path, leaf, spec, d.contract) if d.quantized else leaf
           for d, (_, leaf) in zip(decisions, leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


def dequantize(tree: Any) -> Any:
    """The pytree with every :class:`QuantizedArray` replaced by its float values."""
    return jax.tree_util.tree_map(lambda x: x.dequantize() if is_quantized(x) else x, tree, is_leaf=is_quantized)


def report(params: Any, qparams: Any) -> dict[str, dict[str, float]]:
    """Per quantized tensor: bytes before and after, bits per weight, max and RMS relative error."""
    out: dict[str, dict[str, float]] = {}
    float_leaves = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, q in jax.tree_util.tree_flatten_with_path(qparams, is_leaf=is_quantized)[0]:
        if not is_quantized(q):
            continue
        w = np.asarray(float_leaves[path], np.float64)
        d = np.asarray(q.dequantize(), np.float64)
        scale = max(float(np.sqrt(np.mean(w * w))), 1e-30)
        out[_path_name(path)] = {
            "bytes_before": float(np.asarray(float_leaves[path]).nbytes), "bytes_after": float(q.nbytes),
            "bits_per_weight": 8.0 * q.nbytes / w.size,
            "max_abs_error": float(np.max(np.abs(d - w))),
            "rms_rel_error": float(np.sqrt(np.mean((d - w) ** 2))) / scale,
        }
        if q.transformed:  # W = T . deq(Q): the Hadamard block (0: none) and whether T scales inputs
            out[_path_name(path)] |= {"rotate_block": float(q.rotate_block), "in_scale": float(q.in_scale is not None)}
    return out
