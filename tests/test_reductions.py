"""Reductions over any axes fuse: softmax on a middle or leading axis, GroupNorm-style statistics
over several axes, at shapes that divide no block, each one kernel matching jax.jit, lowering for
cuda with masks and compiling without spills."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusec
from tests.helpers import assert_trees_close
from tests.test_bounds import check_masks


def _group_norm(x):
    mu = x.mean((0, 1))
    return (x - mu) * jax.lax.rsqrt(x.var((0, 1)) + 1e-5)


def _layer_norm_middle(x):
    mu = x.mean(1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(((x - mu) ** 2).mean(1, keepdims=True) + 1e-5)


CASES = {
    "softmax_axis1": (lambda x: jax.nn.softmax(x, axis=1), (64, 8, 32)),
    "softmax_axis0_odd": (lambda x: jax.nn.softmax(x, axis=0), (5, 100)),
    "group_norm": (_group_norm, (64, 8, 32)),
    "group_norm_odd": (_group_norm, (6, 5, 30)),
    "layer_norm_middle_axis": (_layer_norm_middle, (3, 20, 12)),
    "max_over_middle": (lambda x: jnp.max(x, axis=1) * 2.0, (4, 9, 17)),
}


def _kernels_and_xla(fn, x) -> tuple[int, list[str]]:
    ops = fusec.jit(fn, backend="pallas").lower(x).program.module.entry.ops
    xla = [op.opcode for op in ops if op.opcode not in ("kernel", "reshape", "constant")]
    return sum(op.opcode == "kernel" for op in ops), xla


@pytest.mark.parametrize("name", sorted(CASES))
def test_reduction_over_any_axes_is_one_kernel_and_matches(name: str) -> None:
    fn, shape = CASES[name]
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    kernels, xla = _kernels_and_xla(fn, x)
    assert kernels == 1 and not xla, (kernels, xla)
    assert_trees_close(fusec.jit(fn, backend="pallas")(x), jax.jit(fn)(x), loose=True)


def test_issue_shapes_softmax_axis1_and_group_norm() -> None:
    x = jnp.zeros((64, 8, 32))
    assert _kernels_and_xla(lambda x: jax.nn.softmax(x, axis=1), x) == (1, [])
    kernels, xla = _kernels_and_xla(_group_norm, x)
    assert kernels <= 2 and "reduce" not in xla


def test_nan_propagates_through_a_middle_axis_max() -> None:
    x = np.random.default_rng(1).standard_normal((4, 9, 17)).astype(np.float32)
    x[2, 5, 3] = np.nan
    got = fusec.jit(lambda x: jnp.max(x, axis=1), backend="pallas")(jnp.asarray(x))
    np.testing.assert_array_equal(np.isnan(np.asarray(got)), np.isnan(np.max(x, axis=1)))


@pytest.mark.parametrize("name", ["softmax_axis1", "softmax_axis0_odd", "group_norm_odd"])
def test_reductions_over_any_axes_lower_for_cuda_masked_without_spills(name: str) -> None:
    fn, shape = CASES[name]
    f = fusec.jit(fn, backend="pallas", interpret=False)
    x = jnp.zeros(shape)
    check_masks(f, x)
    for r in f.lower(x).gpu_resources(90):
        assert r.spills == 0, r


def test_bf16_softmax_over_leading_axis() -> None:
    x = jnp.asarray(np.random.default_rng(2).standard_normal((7, 3, 40)), jnp.bfloat16)
    fn = lambda x: jax.nn.softmax(x, axis=0)  # noqa: E731
    assert _kernels_and_xla(fn, x)[0] == 1
    assert_trees_close(fusec.jit(fn, backend="pallas")(x), jax.jit(fn)(x), loose=True)
