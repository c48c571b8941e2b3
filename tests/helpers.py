"""Shared test helpers: comparing fusec.jit against jax.jit."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Documented tolerances for fusec vs jax.jit (the reference backend emits the same lax ops, so
# float32 results normally agree to the last bit; bfloat16 has 8 significant bits).
TOLERANCES = {
    "float32": dict(rtol=1e-5, atol=1e-6),
    "bfloat16": dict(rtol=2e-2, atol=2e-2),
    "float16": dict(rtol=2e-3, atol=2e-3),
    "float64": dict(rtol=1e-12, atol=1e-12),
}


# Kernels sum in their own order (blocked matmuls, row reductions in registers): float32 results
# then differ from XLA's in the last bits.
KERNEL_TOLERANCES = TOLERANCES | {"float32": dict(rtol=2e-5, atol=2e-5)}

# On a GPU, a float32 matmul at JAX's default precision runs in TF32 (10 mantissa bits; the kernel's
# TTIR says `inputPrecision = tf32`, as XLA's own GPU dots do): each product carries a relative
# error up to 2^-11, so a K-term dot differs from a float32 one by about sqrt(K) * 2^-11 * |x||w|.
# `precision=HIGHEST` kernels are IEEE float32 and use KERNEL_TOLERANCES. GPU-run tests of default-
# precision float32 matmuls compare against jax.jit on the same GPU (also TF32) with this tolerance.
GPU_TF32_TOLERANCES = TOLERANCES | {"float32": dict(rtol=5e-3, atol=5e-3)}


def assert_trees_close(got: Any, want: Any, loose: bool = False) -> None:
    """Same tree structure, same shapes and dtypes, values within the dtype's tolerance
    (``loose``: the tolerance for generated kernels)."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = jnp.asarray(g), jnp.asarray(w)
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        if w.dtype.kind in "biu" or jnp.issubdtype(w.dtype, jax.dtypes.prng_key):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        else:
            tol = (KERNEL_TOLERANCES if loose else TOLERANCES).get(w.dtype.name, dict(rtol=1e-5, atol=1e-6))
            np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), **tol)


def golden_cases(path: Any) -> list[tuple[str, str, str]]:
    """A golden file's cases: (pipeline, input text, expected text), separated by ``// -----``."""
    cases = []
    for chunk in path.read_text().split("// -----"):
        run = next(line for line in chunk.splitlines() if line.startswith("// RUN:"))
        given_text, expected_text = chunk.split("// EXPECT:")
        cases.append((run.removeprefix("// RUN:").strip(), given_text, expected_text))
    return cases
