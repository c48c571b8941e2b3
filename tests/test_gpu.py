"""On an NVIDIA GPU: fusec's Triton kernels against jax.jit on the same GPU, at shapes that divide
no block (where an unmasked access would read or write out of bounds). Skipped without a GPU;
`bench/` and BENCHMARKS.md say how a GPU session runs them."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusec
from fusec import lowprec
from tests.helpers import GPU_TF32_TOLERANCES, KERNEL_TOLERANCES, TOLERANCES

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
pytestmark = pytest.mark.gpu


def _close(got, want, tolerances) -> None:
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        tol = tolerances.get(jnp.asarray(w).dtype.name, dict(rtol=1e-5, atol=1e-6))
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), **tol)


def _gpu(fn):
    return fusec.jit(fn, backend="pallas", interpret=False)


def _random(shape, seed: int, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@pytest.mark.parametrize("width", [768, 1000])
def test_norms_and_softmax_at_partial_widths(width: int) -> None:
    x, g = _random((5, width), 0), _random((width,), 1)

    def layernorm(x, g):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) * jax.lax.rsqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * g

    for fn in (layernorm, lambda x, g: jax.nn.softmax(x * g, axis=-1)):
        _close(_gpu(fn)(x, g), jax.jit(fn)(x, g), KERNEL_TOLERANCES)


@pytest.mark.parametrize("m", [1, 3, 5, 16])
def test_low_bit_gemv(m: int) -> None:
    qw = lowprec.quantize({"w": _random((256, 200), 2)}, lowprec.QuantSpec(4, 128))["w"]
    x = _random((m, 256), 3)
    want = x @ lowprec.dequantize(qw).astype(jnp.float32)
    _close(_gpu(lambda x, w: x @ w)(x, qw), want, GPU_TF32_TOLERANCES)


def test_highest_precision_matmul_is_ieee_float32() -> None:
    x, w = _random((5, 300), 4), _random((300, 40), 5)
    fn = lambda x, w: jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)  # noqa: E731
    _close(_gpu(fn)(x, w), jax.jit(fn)(x, w), KERNEL_TOLERANCES)


@pytest.mark.parametrize("batch,seq", [(1, 1), (2, 100)])
def test_gpt2_block(batch: int, seq: int) -> None:
    from quickstart import gpt2_block, init_params

    params = init_params(jax.random.key(0))
    x = _random((batch, seq, 64), 6)
    fn = jax.vmap(gpt2_block, in_axes=(0, None))
    _close(_gpu(fn)(x, params), jax.jit(fn)(x, params), GPU_TF32_TOLERANCES)


def test_bf16_mlp() -> None:
    x, w = _random((3, 96), 7, jnp.bfloat16), _random((96, 72), 8, jnp.bfloat16)
    fn = lambda x, w: jax.nn.gelu(x @ w)  # noqa: E731
    _close(_gpu(fn)(x, w), jax.jit(fn)(x, w), TOLERANCES)
