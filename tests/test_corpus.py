"""fusec.jit against jax.jit on the corpus, in float32 and bfloat16, plus grad and vmap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusec
from tests.corpus import CORPUS, Case
from tests.helpers import assert_trees_close

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def _args(case: Case, dtype: str) -> tuple:
    return case.make_args(DTYPES[dtype], np.random.default_rng(sum(map(ord, case.name))))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.name)
def test_matches_jax_jit(case: Case, dtype: str) -> None:
    args = _args(case, dtype)
    fn = fusec.jit(case.fn, static_argnums=case.static_argnums)
    want = jax.jit(case.fn, static_argnums=case.static_argnums)(*args)
    assert_trees_close(fn(*args), want)
    lowered = fn.lower(*args)
    if case.falls_back:
        assert lowered.fallbacks, "expected an opaque fallback"
    else:
        assert not lowered.fallbacks, f"unexpected fallbacks: {lowered.fallbacks}"


def _float_loss(fn, static_argnums):
    def loss(*args):
        out = fn(*args)
        return sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(out)
                   if jnp.issubdtype(x.dtype, jnp.floating))
    return loss


def _float_argnums(args: tuple, static: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(i for i, a in enumerate(args) if i not in static and all(
        jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) for x in jax.tree.leaves(a)))


GRAD_CASES = [c for c in CORPUS if c.differentiable]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c.name)
def test_grad_matches(case: Case) -> None:
    args = _args(case, "f32")
    argnums = _float_argnums(args, case.static_argnums)
    if not argnums:
        pytest.skip("no float arguments")
    fused = fusec.jit(case.fn, static_argnums=case.static_argnums)
    got = jax.grad(_float_loss(fused, case.static_argnums), argnums=argnums)(*args) if not case.static_argnums \
        else jax.grad(lambda *a: _float_loss(fused, ())(*a, *[args[i] for i in case.static_argnums]),
                      argnums=argnums)(*[a for i, a in enumerate(args) if i not in case.static_argnums])
    ref_fn = jax.jit(case.fn, static_argnums=case.static_argnums)
    want = jax.grad(_float_loss(ref_fn, case.static_argnums), argnums=argnums)(*args) if not case.static_argnums \
        else jax.grad(lambda *a: _float_loss(ref_fn, ())(*a, *[args[i] for i in case.static_argnums]),
                      argnums=argnums)(*[a for i, a in enumerate(args) if i not in case.static_argnums])
    assert_trees_close(got, want)


VMAP_CASES = ["mlp", "layernorm", "softmax", "attention_causal", "reductions", "swiglu", "rmsnorm",
              "einsum_multi_contract", "gelu_exact", "reshape_transpose", "scan_fallback", "scatter_fallback"]


@pytest.mark.parametrize("name", VMAP_CASES)
def test_vmap_matches(name: str) -> None:
    case = next(c for c in CORPUS if c.name == name)
    args = _args(case, "f32")
    batched = jax.tree.map(lambda a: jnp.stack([a, a * 0.5 + 0.25]) if jnp.issubdtype(a.dtype, jnp.floating)
                           else jnp.stack([a, a]), args[0])
    in_axes = (0,) + (None,) * (len(args) - 1)
    got = jax.vmap(fusec.jit(case.fn), in_axes=in_axes)(batched, *args[1:])
    want = jax.vmap(jax.jit(case.fn), in_axes=in_axes)(batched, *args[1:])
    assert_trees_close(got, want)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.name)
def test_pallas_matches_jax_jit(case: Case, dtype: str) -> None:
    args = _args(case, dtype)
    fn = fusec.jit(case.fn, static_argnums=case.static_argnums, backend="pallas", interpret=True)
    want = jax.jit(case.fn, static_argnums=case.static_argnums)(*args)
    assert_trees_close(fn(*args), want, loose=True)
