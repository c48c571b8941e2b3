"""Differentiation of attention kernels through fused backward kernels.

The JVP of an attention kernel (:func:`attention_jvp`) runs the forward that also writes the
rows' log-sum-exp and returns, as the tangent, ``fusec_attention_lin``: a primitive linear in the
tangents of Q, K and V whose residuals are the kernel's inputs, O and the log-sum-exp. Evaluated
forwards (``jax.jvp``) it is the reference's JVP; transposed (``jax.grad``, ``jax.vjp``) it runs
the ``pre``, ``dkv`` and ``dq`` kernels (FlashAttention-2's backward) and lays their per-head
gradients out as the operands (summing a GQA group, adding the parts of a fused QKV array), so no
[Tq, Tk] array is made. Higher derivatives go through the reference's VJP (custom JVPs on the fused
pieces), so they stay exact. A kernel whose bias needs a gradient, or whose chain the backward
cannot differentiate, keeps the reference's JVP, with a warning that says so.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
from jax import lax
from jax.interpreters import ad, batching, mlir

from fusec.codegen.attention_grad import AttentionGrad, GradMap
from fusec.codegen.kernel_spec import KernelSpec
from fusec.codegen.xla import numpy_dtype
from fusec.runtime.jax_internals import kernel_result_aval

attention_lin_p = jcore.Primitive("fusec_attention_lin")
_WARNED: set[tuple[str, str]] = set()


def _warn(spec: KernelSpec, why: str) -> None:
    if (spec.name, why) not in _WARNED:
        _WARNED.add((spec.name, why))
        warnings.warn(f"fusec: attention kernel {spec.name} is differentiated through its reference (XLA, with "
                      f"[Tq, Tk] matrices), not fused backward kernels: {why}", stacklevel=3)


def attention_jvp(spec: KernelSpec, primals: list[Any], tangents: list[Any]) -> tuple[list[Any], list[Any]] | None:
    """The fused JVP of attention kernel ``spec``, or None where the reference's JVP must run."""
    grad = spec.attention_grad()
    if isinstance(grad, str):
        _warn(spec, grad)
        return None
    nonzero = [i for i, t in enumerate(tangents) if type(t) is not ad.Zero]
    if set(nonzero) - set(grad.diff_inputs):
        _warn(spec, "a bias or other side input needs a gradient")
        return None
    o, lse = _forward(grad, spec, tuple(primals))
    if not nonzero:
        return [o], [ad.Zero(jax.typeof(o).to_tangent_aval())]
    tans = [ad.instantiate_zeros(tangents[i]) for i in grad.diff_inputs]
    return [o], [attention_lin_p.bind(*primals, o, lse, *tans, grad=grad, spec=spec)]


def _reference_out(spec: KernelSpec, grad: AttentionGrad, primals: tuple[Any, ...]) -> Any:
    """O as a function of the differentiated inputs alone (the others closed over)."""
    def f(*d: Any) -> Any:
        full = list(primals)
        for i, x in zip(grad.diff_inputs, d):
            full[i] = x
        return spec.reference(*full)[0]
    return f


def _forward(grad: AttentionGrad, spec: KernelSpec, primals: tuple[Any, ...]) -> tuple[Any, Any]:
    @jax.custom_jvp
    def forward(*args: Any) -> tuple[Any, Any]:
        o, lse = jax.tree.leaves(_call(grad.forward, list(args)))
        return o, lse

    @forward.defjvp
    def forward_jvp(ps: tuple[Any, ...], ts: tuple[Any, ...]) -> tuple[Any, Any]:
        # Only O's tangent is ever read: the log-sum-exp is a residual of the fused backward, whose
        # own derivatives come from the reference's VJP (below), which does not read it.
        o, lse = forward(*ps)
        d = [ts[i] for i in grad.diff_inputs]
        _, o_dot = jax.jvp(_reference_out(spec, grad, ps), tuple(ps[i] for i in grad.diff_inputs), tuple(d))
        return (o, lse), (o_dot, jnp.zeros_like(lse))

    return forward(*primals)


_KERNEL_CALL: list[Callable[[KernelSpec, list[Any]], list[Any]]] = []


def register_kernel_call(call: Callable[[KernelSpec, list[Any]], list[Any]]) -> None:
    """How a kernel is bound (the kernel primitive registers itself: this module never imports it)."""
    _KERNEL_CALL[:] = [call]


def _call(spec: KernelSpec, args: list[Any]) -> list[Any]:
    return list(_KERNEL_CALL[0](spec, args))


def _lin_impl(*args: Any, grad: AttentionGrad, spec: KernelSpec) -> Any:
    n = len(spec.in_types)
    primals, tans = tuple(args[:n]), tuple(args[n + 2:])
    return jax.jvp(_reference_out(spec, grad, primals), tuple(primals[i] for i in grad.diff_inputs), tans)[1]


def _lin_abstract(*avals: Any, grad: AttentionGrad, spec: KernelSpec) -> Any:
    t = spec.out_types[0]
    return kernel_result_aval(t.shape, numpy_dtype(t.elem), avals)


def _lin_transpose(ct: Any, *args: Any, grad: AttentionGrad, spec: KernelSpec) -> list[Any]:
    n = len(spec.in_types)
    if type(ct) is ad.Zero:
        return [None] * len(args)
    grads = fused_backward(grad, spec, tuple(args[:n]), args[n], args[n + 1], ct)
    return [None] * (n + 2) + list(grads)


def _lin_batch(args: list[Any], dims: list[Any], **params: Any) -> tuple[Any, int]:
    in_axes = [d if isinstance(d, int) else None for d in dims]
    return jax.vmap(functools.partial(_lin_impl, **params), in_axes=in_axes)(*args), 0


def _lin_jvp(primals: list[Any], tangents: list[Any], **params: Any) -> tuple[Any, Any]:
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    return jax.jvp(functools.partial(_lin_impl, **params), tuple(primals), tuple(tangents))


def fused_backward(grad: AttentionGrad, spec: KernelSpec, primals: tuple[Any, ...], o: Any, lse: Any,
                   do: Any) -> list[Any]:
    """The gradients of the differentiated inputs for output cotangent ``do``: the backward
    kernels (their own derivative is the reference VJP's)."""

    @jax.custom_jvp
    def backward(ps: tuple[Any, ...], o: Any, lse: Any, do: Any) -> list[Any]:
        return _run_backward(grad, ps, o, lse, do)

    @backward.defjvp
    def backward_jvp(p: tuple[Any, ...], t: tuple[Any, ...]) -> tuple[Any, Any]:
        (ps, _, _, do), (tps, _, _, tdo) = p, t
        diff = grad.diff_inputs

        def reference(d: tuple[Any, ...], do: Any) -> list[Any]:
            _, vjp = jax.vjp(_reference_out(spec, grad, ps), *d)
            return list(vjp(do))

        return jax.jvp(reference, (tuple(ps[i] for i in diff), do), (tuple(tps[i] for i in diff), tdo))

    return backward(primals, o, lse, do)


def _run_backward(grad: AttentionGrad, primals: tuple[Any, ...], o: Any, lse: Any, do: Any) -> list[Any]:
    (dd,) = _call(grad.pre, [o, do])
    dk, dv = _call(grad.dkv, [*primals, do, lse, dd])
    (dq,) = _call(grad.dq, [*primals, do, lse, dd])
    canonical = {"dq": dq, "dk": dk, "dv": dv}
    out: dict[int, Any] = {}
    for g in grad.maps:
        part = to_operand(canonical[g.which], g, primals[g.position].shape)
        out[g.position] = part if g.position not in out else out[g.position] + part
    return [out[i].astype(primals[i].dtype) for i in grad.diff_inputs]


def to_operand(c: Any, g: GradMap, shape: tuple[int, ...]) -> Any:
    """Canonical gradient ``c`` (f32[B, T, depth], per query head) laid out as an array of the
    operand's ``shape``: element (b, t, e) goes where the forward read it (a GQA group's heads
    land on one key/value head and add up; a fused QKV array's part is padded into its heads).
    Reshapes, a sum and a transpose where the labels allow, else a scatter-add."""
    out = _relayout(c, g, shape)
    return _scatter(c, g, shape) if out is None else out


def _relayout(c: Any, g: GradMap, shape: tuple[int, ...]) -> Any | None:
    batch, t, depth = c.shape
    heads = [r for r in g.roles if r[0] in ("b", "m")]
    cuts = sorted({1, batch} | {x for _, stride, size in heads for x in (stride, stride * size)})
    if cuts[-1] != batch or any(hi % lo for lo, hi in zip(cuts, cuts[1:])):
        return None
    factors = [(lo, hi // lo) for lo, hi in zip(cuts, cuts[1:])][::-1]  # row-major: largest stride first
    x = c.reshape([n for _, n in factors] + [t, depth])
    seq, dim = len(factors), len(factors) + 1
    order: list[list[int]] = []
    covered: list[int] = []
    for kind, stride, size in g.roles:
        axes = [i for i, (lo, _) in enumerate(factors) if stride <= lo < stride * size] if kind in ("b", "m") else []
        covered += axes
        order.append(axes + [dim] if kind == "m" else axes if kind == "b" else [seq] if kind in ("q", "k") else
                     [dim] if kind == "d" else [])
    if len(set(covered)) != len(covered) or sum(len(a) for a in order) != len(covered) + 2:
        return None
    missing = tuple(i for i in range(len(factors)) if i not in covered)
    x = x.sum(axis=missing, keepdims=True) if missing else x  # a GQA group adds up
    x = jnp.transpose(x, [a for axes in order for a in axes] + list(missing))
    dims = []
    at = 0
    for axes in order:
        dims.append(math.prod(x.shape[at:at + len(axes)]) if axes else 1)
        at += len(axes)
    x = x.reshape(dims)
    pads = []
    for d, (role, n) in enumerate(zip(g.roles, shape)):
        before = g.offset * depth if role[0] == "m" else 0
        if n - dims[d] - before < 0:
            return None
        pads.append((before, n - dims[d] - before))
    return jnp.pad(x, pads) if any(p != (0, 0) for p in pads) else x


def _scatter(c: Any, g: GradMap, shape: tuple[int, ...]) -> Any:
    iota = [lax.broadcasted_iota(jnp.int32, c.shape, d) for d in range(3)]
    b, t, e = iota
    index = []
    for role in g.roles:
        kind, stride, size = role
        if kind == "b":
            index.append((b // stride) % size)
        elif kind in ("q", "k"):
            index.append(t)
        elif kind == "d":
            index.append(e)
        elif kind == "m":
            index.append(((b // stride) % size + g.offset) * g.depth + e)
        else:
            index.append(jnp.zeros(c.shape, jnp.int32))
    return jnp.zeros(shape, jnp.float32).at[tuple(index)].add(c, mode="promise_in_bounds")


attention_lin_p.def_impl(_lin_impl)
attention_lin_p.def_abstract_eval(_lin_abstract)
mlir.register_lowering(attention_lin_p, mlir.lower_fun(_lin_impl, multiple_results=False))
ad.primitive_transposes[attention_lin_p] = _lin_transpose
ad.primitive_jvps[attention_lin_p] = _lin_jvp
batching.primitive_batchers[attention_lin_p] = _lin_batch
