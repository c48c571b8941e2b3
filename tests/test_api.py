"""fusec.jit follows jax.jit's calling conventions."""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusec
from fusec.ir import parse_module, verify_module
from tests.helpers import assert_trees_close


def _same_error(fn, jax_fn, *args, **kwargs):
    """Calls both; both must raise the same exception type with the same message."""
    with pytest.raises(Exception) as want:
        jax_fn(*args, **kwargs)
    with pytest.raises(type(want.value)) as got:
        fn(*args, **kwargs)
    # Messages may name the function with its address; fusec's wrapper has its own.
    assert re.sub(r"0x[0-9a-f]+", "0x", str(got.value)) == re.sub(r"0x[0-9a-f]+", "0x", str(want.value))
    assert "fusec" not in type(got.value).__module__
    return got.value


def test_decorator_forms() -> None:
    @fusec.jit
    def a(x):
        return x * 2

    @fusec.jit(backend="xla")
    def b(x):
        return x * 3

    c = functools.partial(fusec.jit, static_argnums=1)(lambda x, n: x * n)
    x = jnp.arange(3.0)
    np.testing.assert_array_equal(a(x), x * 2)
    np.testing.assert_array_equal(b(x), x * 3)
    np.testing.assert_array_equal(c(x, 4), x * 4)
    assert a.__name__ == "a" and isinstance(a, fusec.FusecFunction)


class Pair(NamedTuple):
    first: jax.Array
    second: jax.Array


def test_pytrees_in_and_out() -> None:
    def f(params, batch, *, scale):
        y = batch.first @ params["w"] + params["b"]
        return {"y": y * scale, "pair": Pair(y.sum(), batch.second), "none": None, "list": [batch.second]}

    params = {"w": jnp.ones((3, 2)), "b": jnp.arange(2.0)}
    batch = Pair(jnp.ones((4, 3)), jnp.zeros(5))
    assert_trees_close(fusec.jit(f)(params, batch, scale=2.0), jax.jit(f)(params, batch, scale=2.0))


def test_static_args_by_number_and_name_retrace_per_value() -> None:
    traces = []

    def f(x, n, mode="sum"):
        traces.append((n, mode))
        y = sum(x**k for k in range(n))
        return y.sum() if mode == "sum" else y.max()

    x = jnp.linspace(0, 1, 5)
    by_num = fusec.jit(f, static_argnums=(1, 2))
    by_name = fusec.jit(f, static_argnames=("n", "mode"))
    for fn in (by_num, by_name):
        np.testing.assert_allclose(fn(x, 3, "sum"), f(x, 3, "sum"), rtol=1e-6)
        np.testing.assert_allclose(fn(x, n=4, mode="max"), f(x, 4, "max"), rtol=1e-6)
    assert by_num.cache_size() == 2 and by_name.cache_size() == 2
    traces.clear()
    by_num(x, 3, "sum")
    assert traces == []  # cached: the Python function is not traced again


def test_retrace_on_new_shape_or_dtype_only() -> None:
    count = []

    @fusec.jit
    def f(x):
        count.append(x.shape)
        return jnp.tanh(x)

    f(jnp.ones(3))
    f(jnp.zeros(3))
    assert f.cache_size() == 1
    n = len(count)
    f(jnp.zeros(3))
    assert len(count) == n
    f(jnp.ones(4))
    f(jnp.ones(4, jnp.bfloat16))
    assert f.cache_size() == 3


def test_keyword_arguments_and_defaults() -> None:
    def f(x, y=None, *, bias=1.0):
        return x + (0 if y is None else y) + bias

    x = jnp.ones(2)
    assert_trees_close(fusec.jit(f)(x, y=x, bias=3.0), jax.jit(f)(x, y=x, bias=3.0))
    assert_trees_close(fusec.jit(f)(x), jax.jit(f)(x))


def test_python_scalars_keep_weak_typing() -> None:
    def f(x, s):
        return x * s + s

    for x in (jnp.ones(3, jnp.bfloat16), jnp.ones(3, jnp.float16)):
        for s in (2.0, 3, True):
            got, want = fusec.jit(f)(x, s), jax.jit(f)(x, s)
            assert got.dtype == want.dtype
            assert_trees_close(got, want)
    for g in (lambda s: s * 2, lambda x, s: (x * s, s + 1)):
        args = (1.5,) if g.__code__.co_argcount == 1 else (jnp.ones(2, jnp.bfloat16), 2.0)
        got, want = fusec.jit(g)(*args), jax.jit(g)(*args)
        assert jax.tree.map(jax.typeof, got) == jax.tree.map(jax.typeof, want)  # weak types included


def test_donation_behaves_like_jax_jit() -> None:
    def f(x):
        return x * 2 + 1

    a, b = jnp.arange(8.0), jnp.arange(8.0)
    out_f = fusec.jit(f, donate_argnums=0)(a)
    out_j = jax.jit(f, donate_argnums=0)(b)
    np.testing.assert_array_equal(out_f, out_j)
    assert a.is_deleted() == b.is_deleted()


def test_lower_gives_text_after_every_stage() -> None:
    def f(x, w):
        return jax.nn.relu(x @ w) + jnp.cumsum(x, 0)[:, :1]

    lowered = fusec.jit(f).lower(jax.ShapeDtypeStruct((4, 8), jnp.float32), jnp.ones((8, 8)))
    assert lowered.stages == ("input", *fusec.DEFAULT_PIPELINE)
    for stage in (*lowered.stages, "final"):
        module = parse_module(lowered.as_text(stage))
        verify_module(module)
    assert "call" in lowered.as_text("input") and "call" not in lowered.as_text("inline")
    assert lowered.as_text() == lowered.as_text("dce")
    assert [fb.primitive for fb in lowered.fallbacks] == ["cumsum"]
    assert "no fusec rule for primitive 'cumsum'" in lowered.fallbacks[0].reason
    with pytest.raises(ValueError, match="no stage 'bogus'"):
        lowered.as_text("bogus")
    compiled = lowered.compile()
    np.testing.assert_allclose(compiled(jnp.ones((4, 8)), jnp.ones((8, 8)))[0, 0], 9.0)


def test_passes_option_overrides_pipeline() -> None:
    f = lambda x: jnp.exp(x) + jnp.exp(x)  # noqa: E731
    x = jnp.ones(3)
    assert fusec.jit(f, passes="").lower(x).stages == ("input",)
    lowered = fusec.jit(f, passes="cse,dce").lower(x)
    assert lowered.stages == ("input", "cse", "dce")
    assert lowered.as_text().count("exp") == 1
    assert lowered.as_text("input").count("exp") == 2
    with pytest.raises(ValueError, match="unknown pass"):
        fusec.jit(f, passes="fuse-everything")


def test_backend_option_errors() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        fusec.jit(jnp.sin, backend="cuda")


def test_bad_inputs_raise_what_jax_jit_raises() -> None:
    f = lambda x: x + 1  # noqa: E731
    _same_error(fusec.jit(f), jax.jit(f), "not an array")
    g = lambda x, opts: x * len(opts)  # noqa: E731
    _same_error(fusec.jit(g, static_argnums=1), jax.jit(g, static_argnums=1), jnp.ones(2), {"a": 1})
    h = lambda x, y: x @ y  # noqa: E731
    _same_error(fusec.jit(h), jax.jit(h), jnp.ones((2, 3)), jnp.ones((4, 5)))

    def boom(x):
        raise ValueError("user code failed")

    err = _same_error(fusec.jit(boom), jax.jit(boom), jnp.ones(2))
    assert isinstance(err, ValueError)
    with pytest.raises(TypeError):
        fusec.jit(42)


def test_composes_with_jax_transformations() -> None:
    def f(x, w):
        return jnp.sum(jnp.tanh(x @ w) ** 2)

    x, w = jnp.linspace(-1, 1, 12).reshape(3, 4), jnp.linspace(0, 1, 8).reshape(4, 2)
    ff = fusec.jit(f)
    assert_trees_close(jax.jit(ff)(x, w), jax.jit(f)(x, w))
    assert_trees_close(jax.grad(ff, argnums=(0, 1))(x, w), jax.grad(f, argnums=(0, 1))(x, w))
    assert_trees_close(jax.jvp(lambda a: ff(a, w), (x,), (jnp.ones_like(x),)),
                       jax.jvp(lambda a: f(a, w), (x,), (jnp.ones_like(x),)))
    assert_trees_close(jax.hessian(lambda a: ff(a, w))(x), jax.hessian(lambda a: f(a, w))(x))
    assert_trees_close(jax.vmap(ff, (0, None))(jnp.stack([x, -x]), w), jax.vmap(f, (0, None))(jnp.stack([x, -x]), w))

    def scan_body(c, xi):
        return c + ff(xi, w), ff(xi, w)

    assert_trees_close(jax.lax.scan(scan_body, 0.0, jnp.stack([x, x * 2])),
                       jax.lax.scan(lambda c, xi: (c + f(xi, w), f(xi, w)), 0.0, jnp.stack([x, x * 2])))


def test_gradient_through_closed_over_value() -> None:
    x = jnp.linspace(0, 1, 6)

    def outer(w, compile_fn):
        return compile_fn(lambda y: jnp.sum(jnp.sin(y * w)))(x)

    assert_trees_close(jax.grad(outer)(1.5, fusec.jit), jax.grad(outer)(1.5, jax.jit))


def test_custom_derivative_rules_are_honoured() -> None:
    @jax.custom_jvp
    def clipped(x):
        return jnp.clip(x, -1, 1)

    clipped.defjvp(lambda p, t: (clipped(p[0]), t[0]))  # straight-through estimator
    x = jnp.array([-3.0, 0.5, 2.0])
    g = jax.grad(lambda a: fusec.jit(clipped)(a).sum())(x)
    np.testing.assert_array_equal(g, jnp.ones(3))


def test_side_effects_survive(capfd) -> None:
    @fusec.jit
    def f(x):
        jax.debug.print("seen {}", x.sum())
        return x * 2

    f(jnp.ones(3)).block_until_ready()
    assert "seen 3.0" in capfd.readouterr().out
