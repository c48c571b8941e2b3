"""What every example does at the end: run a function under fusec.jit and jax.jit, print fusec's
report, and check the two agree."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

import fusec


def run_and_compare(fn: Any, *args: Any, rtol: float = 2e-5, atol: float = 2e-5, label: str = "") -> Any:
    """``fusec.jit(fn, backend="pallas")(*args)`` against ``jax.jit(fn)(*args)``; returns fusec's output."""
    compiled = fusec.jit(fn, backend="pallas")
    print(f"# {label or fn.__name__}: fusec report")
    print(compiled.inspect(*args))
    out, ref = compiled(*args), jax.jit(fn)(*args)
    leaves, ref_leaves = jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref)
    err = max(float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)), initial=0.0))
              for a, b in zip(leaves, ref_leaves))
    print(f"# max |fusec.jit - jax.jit| = {err:.3g}")
    for a, b in zip(leaves, ref_leaves, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=rtol, atol=atol)
    print(f"# {label or fn.__name__}: fusec.jit matches jax.jit")
    return out
