"""Regression tests for bugs found by differential testing against ``jax.jit`` (issue 12).

Each test compares ``fusec.jit`` (the Pallas backend in interpret mode and the XLA backend) with
``jax.jit``; bitwise where the bug was about exact values.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fusec
from tests.helpers import assert_trees_close

BACKENDS = ["pallas", "xla"]


def compiled(fn: Any, backend: str, **kw: Any) -> Any:
    return fusec.jit(fn, backend=backend, interpret=True, **kw)


def assert_bitwise(got: Any, want: Any) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    width = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[got.dtype.itemsize]
    np.testing.assert_array_equal(got.view(width), want.view(width))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_nextafter_16bit_is_not_widened(backend: str, dtype: Any) -> None:
    x = np.array([1, 2, -3, .5, 0, -0., 1e-7, 60000], np.float32).astype(dtype)
    y = np.array([2, -2, 5, -1, 1, -1, 0, np.inf], np.float32).astype(dtype)
    assert_bitwise(compiled(jnp.spacing, backend)(x), jax.jit(jnp.spacing)(x))
    assert_bitwise(compiled(lax.nextafter, backend)(x, y), jax.jit(lax.nextafter)(x, y))


@pytest.mark.parametrize("backend", BACKENDS)
def test_signed_zero_constants_are_not_merged(backend: str) -> None:
    def f(x: Any) -> Any:
        zero, neg_zero = jnp.full_like(x, 0.0), jnp.full_like(x, -0.0)
        return (jnp.arctan2(zero, -1.0) + jnp.arctan2(neg_zero, -1.0), 1.0 / zero, 1.0 / neg_zero, x * neg_zero)

    x = np.ones(4, np.float32)
    for got, want in zip(compiled(f, backend)(x), jax.jit(f)(x)):
        assert_bitwise(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_constants_keep_their_sign(backend: str) -> None:
    def f(x: Any) -> Any:
        nan, neg_nan = jnp.full_like(x, np.nan), jnp.full_like(x, -np.nan)
        return nan, neg_nan, jnp.copysign(1.0, neg_nan), jnp.copysign(1.0, nan)

    x = np.ones(4, np.float32)
    for got, want in zip(compiled(f, backend)(x), jax.jit(f)(x)):
        assert_bitwise(got, want)
    # The IR text keeps the sign too.
    from fusec.ir import parse_module, print_module

    module = compiled(f, backend).lower(x).program.module
    assert "-nan" in print_module(module)
    assert print_module(parse_module(print_module(module))) == print_module(module)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(128, 17), (4, 17), (128, 16), (128, 32)])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_max_min_reductions_propagate_nan(backend: str, shape: tuple[int, int], dtype: Any) -> None:
    x = np.ones(shape, np.float32)
    x[3, 2] = np.nan
    x[1, :] = -np.inf
    x = x.astype(dtype)

    def f(x: Any) -> Any:
        return jnp.max(x, axis=-1), jnp.min(x, axis=-1)

    # XLA's max/min propagate NaN, though XLA:CPU's vectorised row reduction drops it for
    # f32[128, 32] (jax.jit gives 1.0 there): kernels are held to NumPy, the XLA backend (plain
    # lax, so XLA:CPU's quirk included) to jax.jit.
    wide = np.asarray(x, np.float32)
    reference = (wide.max(-1), wide.min(-1)) if backend == "pallas" else jax.jit(f)(x)
    for got, want in zip(compiled(f, backend)(x), reference):
        assert np.asarray(got).dtype == x.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strengthening_convert_makes_outputs_strongly_typed(backend: str) -> None:
    def f(x: Any, y: Any) -> Any:
        return jnp.array(x), lax.convert_element_type(y, jnp.float32), y * 2

    got, want = compiled(f, backend)([1], 2.0), jax.jit(f)([1], 2.0)
    assert [jax.typeof(g).weak_type for g in got] == [jax.typeof(w).weak_type for w in want] == [False, False, True]
    assert_trees_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduce", ["max_rows", "max_cols", "min_all"])
def test_max_min_gradients_with_nonfinite_cotangents(backend: str, reduce: str) -> None:
    def loss(a: Any, s: Any) -> Any:
        if reduce == "max_rows":
            return jnp.sum(jnp.max(a, -1) * s)
        if reduce == "max_cols":
            return jnp.sum(jnp.max(a, 0) * s[:a.shape[1]])
        return jnp.min(a) * s[0]

    grad = jax.grad(loss)
    small = (np.array([[1, 2, 3], [4, 6, 5], [0, 1, 0]], np.float32), np.array([np.inf, 2, 1], np.float32))
    a = np.random.default_rng(0).standard_normal((128, 17)).astype(np.float32)
    s = np.ones(128, np.float32)
    s[:3] = (np.inf, -np.inf, np.nan)
    for args in (small, (a, s)):
        # x * convert(mask) acts as a select (XLA rewrites it so): inf * 0 gives 0, not NaN.
        np.testing.assert_array_equal(np.asarray(compiled(grad, backend)(*args)), np.asarray(jax.jit(grad)(*args)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_matmul_with_splat_or_iota_operand(backend: str) -> None:
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((16, 64), np.float32), rng.standard_normal((64, 64), np.float32)

    def mixed(w: Any) -> Any:
        # The splat is a dot operand (a kernel input) and an epilogue operand (recomputed inside).
        full = jnp.full((64, 64), 2.0)
        return (full @ w) * 2.0 + full + lax.broadcasted_iota(jnp.float32, (64, 64), 0) @ w

    cases = [
        (lambda w: jnp.full((16, 64), 2.0) @ w, (w,)),
        (jax.grad(lambda x, w: (x @ w).sum(), argnums=1), (x, w)),
        (mixed, (w,)),
    ]
    for fn, args in cases:
        assert_trees_close(compiled(fn, backend)(*args), jax.jit(fn)(*args), loose=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dot_product_attention_dot_algorithm_presets(backend: str, dtype: Any) -> None:
    # In bf16/f16 JAX picks a DotAlgorithmPreset (BF16_BF16_F32, F16_F16_F32) as the precision.
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 8, 4, 16)).astype(dtype) for _ in range(3))
    fn = compiled(jax.nn.dot_product_attention, backend)
    try:
        want = jax.jit(jax.nn.dot_product_attention)(q, k, v)
    except ValueError as e:
        # XLA:CPU runs no F16_F16_F32 dot: the XLA backend fails as jax.jit does; Pallas kernels
        # (float32 accumulation) are held to the attention of float32 copies.
        if backend == "xla":
            with pytest.raises(ValueError, match=str(e)[:40]):
                fn(q, k, v)
            return
        wide = [np.asarray(x, np.float32) for x in (q, k, v)]
        want = jax.jit(jax.nn.dot_product_attention)(*wide).astype(dtype)
    assert_trees_close(fn(q, k, v), want, loose=True)
    assert not fn.lower(q, k, v).fallbacks


@pytest.mark.parametrize("backend", BACKENDS)
def test_dot_precision_pairs_and_presets_pass_through(backend: str) -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((32, 16), np.float32), rng.standard_normal((16, 32), np.float32)
    P, A = lax.Precision, lax.DotAlgorithmPreset
    for precision in [(P.HIGHEST, P.DEFAULT), (P.HIGH, P.HIGH), A.F32_F32_F32, A.DEFAULT]:
        def fn(a: Any, b: Any, precision: Any = precision) -> Any:
            return jnp.tanh(lax.dot(a, b, precision=precision))

        assert_trees_close(compiled(fn, backend)(a, b), jax.jit(fn)(a, b), loose=True)
        assert not compiled(fn, backend).lower(a, b).fallbacks


def _extended_dtype_without_tangent() -> Any:
    """A float32-backed extended dtype whose rules name no tangent dtype (as in JAX's own
    extended-dtype tests)."""
    import dataclasses

    from jax._src import core, dtypes, earray
    from jax._src.interpreters import pxla

    class foo(dtypes.extended):
        pass

    class FooTyRules:
        allow_conversion: bool = True

        @staticmethod
        def physical_element_aval(foo_dtype: Any) -> Any:
            return core.ShapedArray((), dtypes.dtype("float32"))

        @staticmethod
        def global_sharded_result_handler(aval: Any, out_sharding: Any, committed: Any) -> Any:
            handler = pxla.global_result_handlers[core.ShapedArray](core.physical_aval(aval), out_sharding, committed)
            return lambda bufs: earray.EArray(aval, handler(bufs))

    @dataclasses.dataclass(frozen=True)
    class FooTy(dtypes.ExtendedDType):
        name: str = "foo"
        _rules: type = FooTyRules
        type: type = foo

    return FooTy()


@pytest.mark.parametrize("backend", BACKENDS)
def test_extended_dtype_without_tangent_dtype(backend: str) -> None:
    foo = _extended_dtype_without_tangent()

    def to_foo(x: Any) -> Any:
        return lax.convert_element_type(x, foo)

    def from_foo(y: Any, w: Any) -> Any:
        return lax.convert_element_type(y, jnp.float32) * w

    x = jnp.arange(3, dtype=jnp.float32)
    assert compiled(to_foo, backend)(x).dtype == jax.jit(to_foo)(x).dtype == foo
    y = jax.jit(to_foo)(x)
    assert_trees_close(compiled(from_foo, backend)(y, x), jax.jit(from_foo)(y, x))
    twice = compiled(lambda y, w: from_foo(jax.jit(to_foo)(from_foo(y, w)), w), backend)
    assert_trees_close(twice(y, x), x * x * x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hyp2f1_with_array_parameters_fuses_without_a_cycle(backend: str) -> None:
    # A group grew (after one of its values was read by another group) to read that other group
    # through an op outside both; the cycle check looked at the value, not the whole kernel.
    rng = np.random.default_rng(0)
    a, b, c = (rng.uniform(0.1, 2.0, 8).astype(np.float32) for _ in range(3))
    z = rng.uniform(-0.9, 0.9, 8).astype(np.float32)
    fn = jax.scipy.special.hyp2f1
    assert_trees_close(compiled(fn, backend)(a, b, c, z), jax.jit(fn)(a, b, c, z), loose=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.uint32, np.int32, np.uint8, np.int16])
def test_integer_min_max_reductions_of_partial_rows(backend: str, dtype: Any) -> None:
    info = np.iinfo(dtype)
    u = np.random.default_rng(0).integers(info.min, info.max, (8, 17), dtype=dtype, endpoint=True)
    u[0] = info.max
    u[1] = info.min

    def f(u: Any) -> Any:
        return jnp.min(u, axis=-1), jnp.max(u, axis=-1)

    for got, want in zip(compiled(f, backend)(u), jax.jit(f)(u)):
        assert_bitwise(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sink_reshapes_keeps_row_broadcasts_valid_on_reduced_rows(backend: str) -> None:
    # The row form of s (a reduction of the dot's rows) is [8]: the broadcast of s's mean to
    # [1, 8] was rebuilt as a [1, 1] -> [8] broadcast with dims [0, 1] (VerifyError).
    def f(x: Any, w: Any) -> Any:
        h = jnp.einsum("btd,dn->btn", x, w)
        s = jnp.sum(h * lax.rsqrt(h.mean(-1, keepdims=True) ** 2 + 1e-5), -1)
        return s * lax.rsqrt(s.mean(-1, keepdims=True) ** 2 + 1e-5)

    rng = np.random.default_rng(0)
    # Positive data keeps the means away from 0, where bf16 rounding differences would blow up.
    x = rng.uniform(0.5, 1.0, (1, 8, 32)).astype(jnp.bfloat16)
    w = rng.uniform(0.5, 1.0, (32, 32)).astype(jnp.bfloat16)
    assert_trees_close(compiled(f, backend)(x, w), jax.jit(f)(x, w), loose=True)


@pytest.mark.parametrize("case", ["nextafter_bf16", "nan_max_partial_rows", "uint32_min", "splat_dot", "mask_grad"])
def test_fixed_kernels_compile_for_cuda(case: str) -> None:
    # Interpret mode accepts what Pallas-Triton may not lower (reduce_or, f16 nextafter): the
    # kernels of the fixes above must still compile to a cubin (needs triton, not a GPU).
    rng = np.random.default_rng(0)
    fn, args = {
        "nextafter_bf16": (jnp.spacing, (np.ones(64, jnp.bfloat16),)),
        "nan_max_partial_rows": (lambda x: jnp.max(x, axis=-1), (np.ones((128, 17), jnp.bfloat16),)),
        "uint32_min": (lambda u: jnp.min(u, axis=-1), (np.ones((8, 17), np.uint32),)),
        "splat_dot": (lambda w: jnp.full((16, 64), 2.0) @ w, (rng.standard_normal((64, 32), np.float32),)),
        "mask_grad": (jax.grad(lambda a, s: jnp.max(a) * s[0]), (np.ones((8, 16), np.float32), np.ones(8, np.float32))),
    }[case]
    lowered = fusec.jit(fn, backend="pallas", interpret=False).lower(*args)
    assert lowered.kernel_sources
    assert len(lowered.gpu_resources(90)) >= len(lowered.program.distinct_kernels)
