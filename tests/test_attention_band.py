"""The key band causal and sliding-window masks allow (attention_band.py), which block skipping
relies on: found where exact, refused where skipping could change a row."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusec
from fusec.passes.attention_band import Band, attention_band, visited_blocks
from fusec.passes.attention_match import match_attention


def _band(fn, *args):
    module = fusec.jit(fn, backend="pallas", interpret=True).lower(*args).program.module
    (op,) = [o for o in module.all_ops() if o.opcode == "kernel" and o.attr("kind") == "attention"]
    callee = module.function(str(op.attr("callee")))
    return attention_band(callee, match_attention(callee, next(o for o in callee.ops if o.opcode == "dot")))


def _attn(mask_fn, fill):
    def attn(q, k, v):
        t = q.shape[1]
        i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
        s = jnp.where(mask_fn(i, j, t), jnp.einsum("hqd,hkd->hqk", q, k), fill)
        return jax.nn.softmax(s, axis=-1) @ v
    return attn


QKV = [jnp.ones((2, 40, 16))] * 3
INF = math.inf


@pytest.mark.parametrize("mask_fn,fill,want", [
    (lambda i, j, t: jnp.tril(jnp.ones((t, t), bool)), -1e9, Band(-INF, 0)),
    (lambda i, j, t: jnp.tril(jnp.ones((t, t), bool), k=2), -1e9, Band(-INF, 2)),
    (lambda i, j, t: (j <= i) & (j > i - 8), -jnp.inf, Band(-7, 0)),
    (lambda i, j, t: i >= j + 3, -jnp.inf, Band(-INF, -3)),  # rows 0..2 see no key, but -inf: NaN either way
    (lambda i, j, t: jnp.tril(jnp.ones((t, t), bool), k=-1), -1e9, None),  # row 0 sees no key: not exact
    (lambda i, j, t: jnp.tril(jnp.ones((t, t), bool)), -1e4, None),  # a fill exp() does not flush
])
def test_band(mask_fn, fill, want) -> None:
    assert _band(_attn(mask_fn, fill), *QKV) == want


def test_no_band_with_a_padding_mask_and_a_finite_fill() -> None:
    def attn(q, k, v, mask):
        t = q.shape[1]
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)) & mask[None, None, :], jnp.einsum("hqd,hkd->hqk", q, k),
                      jnp.finfo(jnp.float32).min)
        return jax.nn.softmax(s, axis=-1) @ v

    assert _band(attn, *QKV, jnp.ones((40,), bool)) is None


def test_visited_blocks() -> None:
    assert visited_blocks(Band(-INF, 0), 130, 130, 64, 64) == 1 + 2 + 3
    assert visited_blocks(None, 130, 130, 64, 64) == 9
    assert visited_blocks(Band(-7, 0), 128, 128, 32, 32) == 4 + 3  # the diagonal and the block before it


def test_unskippable_causal_mask_stays_correct() -> None:
    """tril(k=-1) with -1e9: row 0 sees no key (the reference spreads it over all keys); no skipping,
    the same answer and gradient."""
    attn = _attn(lambda i, j, t: jnp.tril(jnp.ones((t, t), bool), k=-1), -1e9)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(x, (2, 70, 16)) for x in keys)
    fused = fusec.jit(attn, backend="pallas", interpret=True)
    np.testing.assert_allclose(fused(q, k, v), attn(q, k, v), rtol=2e-5, atol=2e-5)
    got = jax.grad(lambda q: jnp.sum(fused(q, k, v) ** 2))(q)
    np.testing.assert_allclose(got, jax.grad(lambda q: jnp.sum(attn(q, k, v) ** 2))(q), rtol=2e-4, atol=2e-5)


def test_strictly_below_the_diagonal_with_inf() -> None:
    """j <= i - 3 with -inf: rows 0..2 are NaN as in the reference, the rest exact, blocks skipped."""
    attn = _attn(lambda i, j, t: i >= j + 3, -jnp.inf)
    keys = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(x, (2, 70, 16)) for x in keys)
    np.testing.assert_allclose(fusec.jit(attn, backend="pallas", interpret=True)(q, k, v), attn(q, k, v),
                               rtol=2e-5, atol=2e-5)
