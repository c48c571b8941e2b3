"""One rule per JAX primitive, filled into ``RULES`` by ``@register``.

A rule gets the lowering context, the equation and its IR inputs, and returns the IR values of the
equation's outputs. It raises :class:`NoRule` when it cannot express the equation; the frontend
then emits an ``opaque`` op that XLA runs unchanged, so the program stays correct.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from fusec.frontend.types import elem_type_of
from fusec.ir import Builder, Value
from fusec.ir.opdefs import COMPARISONS, ELEMENTWISE_ANY, ELEMENTWISE_BINARY, ELEMENTWISE_FLOAT
from fusec.ir.types import NUMPY_TO_FUSEC, DType


class Lowerer(Protocol):
    """What a rule may ask of the jaxpr lowerer (fusec/frontend/jaxpr_to_ir.py implements it)."""

    builder: Builder

    def reshape(self, v: Value, shape: tuple[int, ...]) -> Value: ...

    def broadcast_to(self, v: Value, shape: tuple[int, ...]) -> Value: ...

    def inline(self, closed: Any, ins: Sequence[Value], top: bool = False) -> list[Value]: ...

    def call_or_inline(self, closed: Any, ins: Sequence[Value], name: str) -> list[Value]: ...

    def constrain(self, v: Value, sharding: Any) -> Value: ...


Rule = Callable[[Lowerer, Any, list[Value]], Sequence[Value]]
RULES: dict[str, Rule] = {}


class NoRule(Exception):
    """The rule cannot express this equation; the message says why."""


def register(*primitives: str) -> Callable[[Rule], Rule]:
    def wrap(rule: Rule) -> Rule:
        for name in primitives:
            RULES[name] = rule
        return rule
    return wrap


def require_defaults(eqn: Any, **defaults: Any) -> None:
    """Raises NoRule if a parameter other than the handled ones has a non-default value."""
    for key, value in eqn.params.items():
        if key in ("sharding", "out_sharding") and unpartitioned(value):
            continue
        if key in defaults and value is not defaults[key] and value != defaults[key]:
            raise NoRule(f"parameter {key}={value!r} is not supported")


def unpartitioned(sharding: Any) -> bool:
    """Nothing to honour: None, a sharding over an empty mesh (what gradients of one-device code
    carry), or a replicated spec on a mesh of Auto axes (what jnp ops carry under a mesh)."""
    if sharding is None:
        return True
    mesh = getattr(sharding, "mesh", None)
    if mesh is None:
        return False
    if not tuple(getattr(mesh, "axis_names", ("?",))):
        return True
    spec = getattr(sharding, "spec", None)
    auto = all(str(t).endswith("Auto") for t in getattr(mesh, "axis_types", ("?",)))
    return auto and spec is not None and all(s is None for s in spec)


def type_name(dtype: Any) -> str:
    return str(elem_type_of(dtype))


# Primitives whose IR opcode has the same name and whose params are all handled as defaults.
_SAME_NAME = (ELEMENTWISE_FLOAT.replace("round", "") + " " + ELEMENTWISE_ANY + " " + ELEMENTWISE_BINARY + " "
              + COMPARISONS + " population_count clz is_finite").split()


def _out_shape(eqn: Any) -> tuple[int, ...]:
    return tuple(eqn.outvars[0].aval.shape)


def _elementwise(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    require_defaults(eqn, accuracy=None, out_dtype=None)
    # jaxprs let scalars and size-1 dimensions broadcast implicitly; the IR spells it out.
    return [ctx.builder.op(eqn.primitive.name, [ctx.broadcast_to(v, _out_shape(eqn)) for v in ins])]


register(*_SAME_NAME)(_elementwise)


@register("pow")
def _pow(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    # JAX lowers pow(float, int) by converting the exponent to the result's dtype first.
    x, y = ins
    if y.type.elem != x.type.elem:
        y = ctx.builder.op("convert", [y], dtype=str(x.type.elem))
    return [ctx.builder.op("pow", [ctx.broadcast_to(v, _out_shape(eqn)) for v in (x, y)])]


@register("add_any")
def _add_any(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    """Gradient accumulation: an ordinary add."""
    return [ctx.builder.op("add", ins)]


@register("round")
def _round(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    return [ctx.builder.op("round", ins, method=int(eqn.params["rounding_method"]))]


@register("copy", "copy_p", "optimization_barrier_free")
def _identity(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    return ins


@register("integer_pow")
def _integer_pow(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    return [ctx.builder.op("integer_pow", ins, y=int(eqn.params["y"]))]


@register("convert_element_type")
def _convert(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    require_defaults(eqn, sharding=None)
    if not isinstance(elem_type_of(eqn.params["new_dtype"]), DType):
        raise NoRule(f"conversion to {eqn.params['new_dtype']}")
    return [ctx.builder.op("convert", ins, dtype=type_name(eqn.params["new_dtype"]))]


@register("select_n")
def _select(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    return [ctx.builder.op("select", [ctx.broadcast_to(v, _out_shape(eqn)) for v in ins])]


@register("clamp")
def _clamp(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    return [ctx.builder.op("clamp", [ctx.broadcast_to(v, _out_shape(eqn)) for v in ins])]


@register("broadcast_in_dim")
def _broadcast(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    require_defaults(eqn, sharding=None)
    if len(ins) != 1:
        raise NoRule("dynamic shapes are not supported")
    dims = tuple(int(d) for d in eqn.params["broadcast_dimensions"])
    x = ins[0]
    if list(dims) != sorted(dims):  # the IR's broadcast keeps operand axes in order: transpose first
        perm = tuple(sorted(range(len(dims)), key=lambda i: dims[i]))
        x, dims = ctx.builder.op("transpose", [x], perm=perm), tuple(sorted(dims))
    return [ctx.builder.op("broadcast", [x], shape=tuple(eqn.params["shape"]), dims=dims)]


@register("reshape")
def _reshape(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    require_defaults(eqn, sharding=None)
    if len(ins) != 1:
        raise NoRule("dynamic shapes are not supported")
    x = ins[0]
    dims = eqn.params.get("dimensions")
    if dims is not None and tuple(dims) != tuple(range(x.type.rank)):
        # reshape(x, dimensions=p) reads x in the order p: a transpose, then the reshape.
        x = ctx.builder.op("transpose", [x], perm=tuple(int(d) for d in dims))
    return [ctx.reshape(x, tuple(eqn.params["new_sizes"]))]


@register("squeeze", "expand_dims")
def _squeeze(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    return [ctx.builder.op("reshape", ins, shape=tuple(eqn.outvars[0].aval.shape))]


@register("transpose")
def _transpose(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    return [ctx.builder.op("transpose", ins, perm=tuple(eqn.params["permutation"]))]


@register("slice")
def _slice(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    start, limit = tuple(eqn.params["start_indices"]), tuple(eqn.params["limit_indices"])
    strides = eqn.params["strides"] or (1,) * len(start)
    return [ctx.builder.op("slice", ins, start=start, limit=limit, strides=tuple(strides))]


@register("split")
def _split(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    (x,) = ins
    axis, outs, offset = int(eqn.params["axis"]), [], 0
    for size in eqn.params["sizes"]:
        start = tuple(offset if d == axis else 0 for d in range(x.type.rank))
        limit = tuple(offset + size if d == axis else n for d, n in enumerate(x.type.shape))
        outs.append(ctx.builder.op("slice", [x], start=start, limit=limit, strides=(1,) * x.type.rank))
        offset += size
    return outs


@register("concatenate")
def _concatenate(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    return [ctx.builder.op("concatenate", ins, axis=int(eqn.params["dimension"]))]


def _reduce(kind: str) -> Rule:
    def rule(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
        require_defaults(eqn, out_sharding=None)
        return [ctx.builder.op("reduce", ins, kind=kind, axes=tuple(eqn.params["axes"]))]
    return rule


for _kind in ("sum", "prod", "max", "min", "and", "or", "xor"):
    register(f"reduce_{_kind}")(_reduce(_kind))


@register("argmax", "argmin")
def _arg_reduce(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    return [ctx.builder.op(eqn.primitive.name, ins, axes=tuple(eqn.params["axes"]),
                           index_dtype=type_name(eqn.params["index_dtype"]))]


@register("iota")
def _iota(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    require_defaults(eqn, sharding=None)
    if ins:
        raise NoRule("dynamic shapes are not supported")
    return [ctx.builder.op("iota", (), dtype=type_name(eqn.params["dtype"]), shape=tuple(eqn.params["shape"]),
                           dimension=int(eqn.params["dimension"]))]


_PRECISION_ORDER = ("DEFAULT", "HIGH", "HIGHEST")
# Dot algorithm presets a kernel reproduces, with the lax.Precision its K loop then uses (the
# kernel accumulates in float32): the input dtype the preset names must be the operands' own.
_KERNEL_PRESETS = {"DEFAULT": (None, None), "BF16_BF16_F32": ("DEFAULT", "bf16"),
                   "F16_F16_F32": ("DEFAULT", "f16"), "TF32_TF32_F32": ("DEFAULT", "f32"),
                   "F32_F32_F32": ("HIGHEST", "f32")}


def _precision_attrs(precision: Any, operand_elem: str) -> dict[str, Any]:
    """The dot's precision attributes: ``precision`` (a ``lax.Precision`` name, what kernels and
    the XLA backend use), and where JAX's parameter says more, ``algorithm`` (a
    ``lax.DotAlgorithmPreset`` name) or ``precision_pair`` (two different Precision names), which
    the XLA backend passes on exactly."""
    if precision is None:
        return {}
    if type(precision).__name__ == "DotAlgorithmPreset":
        name = precision.name
        if name not in _KERNEL_PRESETS or _KERNEL_PRESETS[name][1] not in (None, operand_elem):
            raise NoRule(f"precision={precision!r} (a dot algorithm kernels do not reproduce)")
        kernel_precision = _KERNEL_PRESETS[name][0]
        return {"algorithm": name} | ({"precision": kernel_precision} if kernel_precision else {})
    values = precision if isinstance(precision, tuple) else (precision, precision)
    names = [getattr(p, "name", None) for p in values]
    if len(names) != 2 or any(n not in _PRECISION_ORDER for n in names):
        raise NoRule(f"precision={precision!r} is not supported")
    if names[0] == names[1]:
        return {"precision": names[0]}
    # Pallas-Triton computes a mixed pair as its lower member (TF32 unless both are HIGHEST).
    return {"precision": min(names, key=_PRECISION_ORDER.index), "precision_pair": tuple(names)}


_WIDENS_EXACTLY = {("bf16", "f32"), ("f16", "f32"), ("bf16", "f64"), ("f16", "f64"), ("f32", "f64")}


def _common_float(ctx: Lowerer, lhs: Value, rhs: Value) -> tuple[Value, Value]:
    """Mixed-dtype float operands: the narrower one converted to the wider (exact), as XLA does."""
    a, b = str(lhs.type.elem), str(rhs.type.elem)
    if (a, b) in _WIDENS_EXACTLY:
        return ctx.builder.op("convert", [lhs], dtype=b), rhs
    if (b, a) in _WIDENS_EXACTLY:
        return lhs, ctx.builder.op("convert", [rhs], dtype=a)
    raise NoRule(f"operands of different dtypes ({a}, {b})")


@register("dot_general")
def _dot_general(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    """Normalises any dot_general to ``dot`` on [B..., M, K] x [B..., K, N] plus transposes/reshapes."""
    require_defaults(eqn, out_sharding=None)
    lhs, rhs = ins
    if lhs.type.elem != rhs.type.elem:
        lhs, rhs = _common_float(ctx, lhs, rhs)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lc, rc, lb, rb = (tuple(int(d) for d in x) for x in (lc, rc, lb, rb))
    lf = tuple(d for d in range(lhs.type.rank) if d not in lc and d not in lb)
    rf = tuple(d for d in range(rhs.type.rank) if d not in rc and d not in rb)
    # Several batch dimensions merge into one: kernels take [B, M, K] x [B, K, N].
    batch = (math.prod(lhs.type.shape[d] for d in lb),) if lb else ()

    def size(v: Value, dims: tuple[int, ...]) -> int:
        return math.prod(v.type.shape[d] for d in dims)

    def canonical(v: Value, b: tuple[int, ...], outer: tuple[int, ...], inner: tuple[int, ...]) -> tuple[Value, bool]:
        # [b, outer, inner] order gives the operand untransposed; [b, inner, outer] transposed.
        straight, swapped = b + outer + inner, b + inner + outer
        identity = tuple(range(v.type.rank))
        if straight != identity and swapped == identity:
            return ctx.reshape(v, batch + (size(v, inner), size(v, outer))), True
        if straight != identity:
            v = ctx.builder.op("transpose", [v], perm=straight)
        return ctx.reshape(v, batch + (size(v, tuple(range(len(b), len(b) + len(outer)))),
                                       size(v, tuple(range(len(b) + len(outer), v.type.rank))))), False

    lhs_c, lhs_t = canonical(lhs, lb, lf, lc)
    rhs_c, rhs_t = canonical(rhs, rb, rc, rf)
    # canonical() puts rhs as [B, K, N] when "straight"; rhs_t means it is stored [B, N, K].
    attrs: dict[str, Any] = {"lhs_t": lhs_t, "rhs_t": rhs_t, "out_dtype": type_name(eqn.outvars[0].aval.dtype)}
    attrs |= _precision_attrs(eqn.params.get("precision"), str(lhs.type.elem))
    out = ctx.builder.op("dot", [lhs_c, rhs_c], **attrs)
    return [ctx.reshape(out, tuple(eqn.outvars[0].aval.shape))]


@register("closed_call", "core_call")
def _closed_call(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    return ctx.inline(eqn.params["call_jaxpr"], ins)


@register("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")
def _custom_derivative(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    # The forward computation is the body; derivatives come from JAX itself (see runtime).
    body = eqn.params.get("call_jaxpr", eqn.params.get("fun_jaxpr"))
    if body is None:
        raise NoRule("no body jaxpr found in its parameters")
    return ctx.inline(body, ins)


@register("remat", "remat2", "checkpoint")
def _remat(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    return ctx.inline(eqn.params["jaxpr"], ins)


_LOW_BIT_FAMILY = {"int": "int", "uint": "uint", "fp": "float", "nf": "nf", "lut": "lut"}


@register("fusec_dequantize")
def _dequantize(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    """fusec's own dequantize primitive: the IR names the low-bit format (``i3g128``, ``nf4gc``)."""
    from fusec.ir.types import PER_CHANNEL, LowBitType

    p = eqn.params
    k = p["shape"][0]
    exp_bits = int(p["layout"][1]) if p["family"] == "fp" else None
    fmt = LowBitType(_LOW_BIT_FAMILY[p["family"]], p["bits"], exp_bits,
                     PER_CHANNEL if p["group"] == k else p["group"], bool(p["has_zeros"]), p.get("packing", "planes"))
    attrs: dict[str, Any] = {"format": str(fmt), "shape": tuple(p["shape"]), "dtype": type_name(p["dtype"])}
    if p["lut"] is not None:
        attrs["lut"] = tuple(float(v) for v in p["lut"])
    return [ctx.builder.op("dequantize", ins, **attrs)]


@register("fusec_input_transform")
def _input_transform(ctx: Lowerer, eqn: Any, ins: list[Value]) -> Sequence[Value]:
    """A quantized matrix's input transform W = T . deq(Q) (weight side); the pass
    fold-input-transforms moves it onto the other operand of the matmuls reading W."""
    return [ctx.builder.op("input_transform", ins, block=int(eqn.params["block"]), axis=int(eqn.params["axis"]),
                           side="weight")]


def literal_value(value: Any) -> int | float | bool | None:
    """A Python scalar for a concrete size-1 array, or None when it is not one IR can hold."""
    try:
        arr = np.asarray(value)
    except Exception:  # a tracer: not a concrete value
        return None
    if arr.size != 1 or arr.dtype.name not in NUMPY_TO_FUSEC or arr.dtype.kind == "c":
        return None
    elem = DType(NUMPY_TO_FUSEC[arr.dtype.name])
    scalar = arr.reshape(())
    if elem.is_bool:
        return bool(scalar)
    if elem.is_int:  # includes int4/uint2 and friends, which NumPy sees as opaque 'V' kinds
        return int(scalar.astype(np.int64))
    return float(scalar.astype(np.float64))
