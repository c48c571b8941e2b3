"""Random programs over special values and every kernel dtype, compared bit for bit.

Inputs mix NaN, +-inf, -0.0 and subnormals into ordinary values; dtypes include float16, bfloat16
and unsigned and 16-bit integers; reductions (max/min, which are exact) run over random sets of
axes of 3-D values whose sizes divide no block. Only ops that round exactly once are drawn, so
fusec's kernels must agree with jax.jit to the bit: NaN positions, the sign of zero and 16-bit
results to the ulp (tolerances would hide a kernel that computes a 16-bit op in float32 wrongly).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import fusec

FLOATS = ["float32", "float16", "bfloat16"]
INTS = ["uint8", "uint16", "int16", "int32", "uint32"]
FLOAT_BINARY = {"add": jnp.add, "sub": jnp.subtract, "mul": jnp.multiply, "max": jnp.maximum,
                "min": jnp.minimum}
INT_BINARY = {"add": jnp.add, "mul": jnp.multiply, "max": jnp.maximum, "min": jnp.minimum,
              "and": jnp.bitwise_and, "or": jnp.bitwise_or, "xor": jnp.bitwise_xor}
UNARY = {"neg": jnp.negative, "abs": jnp.abs}
REDUCE = {"max": jnp.max, "min": jnp.min}


def special_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> jax.Array:
    if dtype in INTS:
        info = np.iinfo(dtype)
        edges = np.array([info.min, info.max, 0, 1, info.max // 2], dtype=np.int64)
        values = rng.integers(info.min, int(info.max) + 1, size=shape, dtype=np.int64)
        pick = rng.random(shape) < 0.3
        values[pick] = rng.choice(edges, size=int(pick.sum()))
        return jnp.asarray(values.astype(dtype))
    tiny = float(jnp.finfo(dtype).smallest_subnormal)
    specials = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, tiny, -3 * tiny], dtype=np.float64)
    values = rng.standard_normal(shape) * 4
    pick = rng.random(shape) < 0.25
    values[pick] = rng.choice(specials, size=int(pick.sum()))
    return jnp.asarray(values, dtype)


@st.composite
def programs(draw: st.DrawFn):
    dtype = draw(st.sampled_from(FLOATS + INTS))
    shape = tuple(draw(st.lists(st.integers(1, 23), min_size=2, max_size=3)))
    steps = []
    n_values = 2  # two inputs of `shape`
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["binary", "unary", "compare_select", "reduce"]))
        a, b = draw(st.integers(0, n_values - 1)), draw(st.integers(0, n_values - 1))
        if kind == "binary":
            steps.append(("binary", draw(st.sampled_from(sorted(INT_BINARY if dtype in INTS else FLOAT_BINARY))), a, b))
        elif kind == "unary" and dtype not in INTS:
            steps.append(("unary", draw(st.sampled_from(sorted(UNARY))), a, a))
        elif kind == "compare_select":
            steps.append(("select", draw(st.sampled_from(["lt", "eq", "ge"])), a, b))
        else:
            axes = tuple(sorted(draw(st.sets(st.integers(0, len(shape) - 1), min_size=1, max_size=len(shape) - 1))))
            steps.append(("reduce", draw(st.sampled_from(sorted(REDUCE))), a, axes))
        n_values += 1
    return dtype, shape, steps


def _run(steps, x, y):
    values = [x, y]
    for kind, fn, a, b in steps:
        u = values[a]
        if kind == "binary":
            v = values[b]
            out = (INT_BINARY if jnp.issubdtype(u.dtype, jnp.integer) else FLOAT_BINARY)[fn](u, v)
        elif kind == "unary":
            out = UNARY[fn](u)
        elif kind == "select":
            v = values[b]
            pred = {"lt": jnp.less, "eq": jnp.equal, "ge": jnp.greater_equal}[fn](u, v)
            out = jnp.where(pred, u, v)
        else:
            # Broadcast the reduction back, so later steps see full-shape values.
            out = jnp.broadcast_to(REDUCE[fn](u, axis=b, keepdims=True), u.shape)
        values.append(out)
    return values[-1]


def assert_bitwise_equal(got: jax.Array, want: jax.Array) -> None:
    g, w = np.asarray(got), np.asarray(want)
    assert g.dtype == w.dtype and g.shape == w.shape
    if jnp.issubdtype(w.dtype, jnp.floating):
        nan_g, nan_w = np.isnan(g.astype(np.float32)), np.isnan(w.astype(np.float32))
        np.testing.assert_array_equal(nan_g, nan_w, err_msg="NaN positions differ")
        bits = f"uint{w.dtype.itemsize * 8}"
        np.testing.assert_array_equal(np.where(nan_w, 0, g.view(bits)), np.where(nan_w, 0, w.view(bits)),
                                      err_msg="values differ in their bits (signed zeros, last ulp)")
    else:
        np.testing.assert_array_equal(g, w)


@settings(max_examples=int(os.environ.get("FUSEC_SPECIAL_EXAMPLES", "40")), deadline=None)
@given(programs())
def test_special_values_match_jax_jit_bit_for_bit(program) -> None:
    dtype, shape, steps = program
    rng = np.random.default_rng(len(steps) * 31 + len(shape))
    x, y = special_array(rng, shape, dtype), special_array(rng, shape, dtype)
    fn = lambda x, y: _run(steps, x, y)  # noqa: E731
    assert_bitwise_equal(fusec.jit(fn, backend="pallas", interpret=True)(x, y), jax.jit(fn)(x, y))


def test_bf16_select_keeps_subnormals() -> None:
    """Found by the test above: a bfloat16 select in a kernel flushed subnormals to zero."""
    tiny = float(jnp.finfo(jnp.bfloat16).smallest_subnormal)
    x = jnp.asarray([[tiny, -3 * tiny, 1.0, 2.0, 0.5]] * 2, jnp.bfloat16)
    y = jnp.ones((2, 5), jnp.bfloat16)
    fn = lambda x, y: jnp.where(x < y, x, y)  # noqa: E731
    assert_bitwise_equal(fusec.jit(fn, backend="pallas", interpret=True)(x, y), jax.jit(fn)(x, y))
