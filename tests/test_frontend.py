"""The jaxpr frontend: dot_general normalisation, implicit broadcasts, fallbacks, constants."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax import lax

import fusec
from fusec.frontend import RULES, jaxpr_to_module
from fusec.ir import verify_module
from tests.helpers import assert_trees_close


@st.composite
def dot_problems(draw: st.DrawFn):
    """Random dot_general dimension numbers over random operand layouts."""
    n_batch, n_contract = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    n_lfree, n_rfree = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    sizes = lambda n: [draw(st.integers(1, 3)) for _ in range(n)]  # noqa: E731
    batch, contract, lfree, rfree = sizes(n_batch), sizes(n_contract), sizes(n_lfree), sizes(n_rfree)
    lperm = draw(st.permutations(range(n_batch + n_contract + n_lfree)))
    rperm = draw(st.permutations(range(n_batch + n_contract + n_rfree)))
    # Logical lhs axes: batch, contract, free; lperm says where each logical axis sits.
    lshape = [0] * len(lperm)
    for logical, pos in enumerate(lperm):
        lshape[pos] = (batch + contract + lfree)[logical]
    rshape = [0] * len(rperm)
    for logical, pos in enumerate(rperm):
        rshape[pos] = (batch + contract + rfree)[logical]
    lb = tuple(lperm[i] for i in range(n_batch))
    rb = tuple(rperm[i] for i in range(n_batch))
    lc = tuple(lperm[n_batch + i] for i in range(n_contract))
    rc = tuple(rperm[n_batch + i] for i in range(n_contract))
    return tuple(lshape), tuple(rshape), ((lc, rc), (lb, rb))


@given(dot_problems(), st.sampled_from([jnp.float32, jnp.bfloat16]))
def test_any_dot_general_normalises_to_canonical_dot(problem, dtype) -> None:
    lshape, rshape, dims = problem
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal(lshape), dtype)
    b = jnp.asarray(rng.standard_normal(rshape), dtype)
    f = lambda x, y: lax.dot_general(x, y, dims)  # noqa: E731
    fused = fusec.jit(f)
    lowered = fused.lower(a, b)
    assert not lowered.fallbacks
    assert lowered.as_text().count(" dot ") == 1
    assert_trees_close(fused(a, b), jax.jit(f)(a, b))


def test_canonical_dot_uses_layout_attributes_instead_of_transposes() -> None:
    x, w = jnp.ones((4, 8)), jnp.ones((16, 8))
    text = fusec.jit(lambda x, w: x @ w.T).lower(x, w).as_text()
    assert "rhs_t = true" in text and "transpose" not in text
    text = fusec.jit(lambda x, w: x.T @ w).lower(jnp.ones((8, 4)), jnp.ones((8, 16))).as_text()
    assert "lhs_t = true" in text and "transpose" not in text


def test_implicit_broadcasts_are_spelled_out() -> None:
    closed = jax.make_jaxpr(lambda x, b: x * 2.0 + b)(jnp.ones((3, 4)), jnp.ones(4))
    module = jaxpr_to_module(closed).module
    verify_module(module)
    for op in module.entry.ops:
        if op.opcode in ("add", "mul"):
            assert all(v.type.shape == (3, 4) for v in op.operands)


def test_unknown_primitive_becomes_opaque_with_reason() -> None:
    closed = jax.make_jaxpr(lambda x: jnp.sort(x) + 1)(jnp.ones(5))
    module = jaxpr_to_module(closed).module
    (opaque,) = [op for op in module.all_ops() if op.opcode == "opaque"]
    assert opaque.attr("primitive") == "sort"
    assert opaque.attr("reason") == "no fusec rule for primitive 'sort'"
    assert module.externals[opaque.attr("ref")].primitive.name == "sort"


def test_unsupported_parameters_fall_back() -> None:
    # A dot_general of an integer and a float operand is valid JAX but not a canonical dot (float
    # operands of different widths are widened exactly; these are not): XLA runs it.
    f = lambda a, b: lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)  # noqa: E731
    a, b = jnp.ones((2, 3), jnp.int8), jnp.ones((3, 2), jnp.float32)
    lowered = fusec.jit(f).lower(a, b)
    assert [fb.primitive for fb in lowered.fallbacks] == ["dot_general"]
    assert "different dtypes" in lowered.fallbacks[0].reason
    assert_trees_close(fusec.jit(f)(a, b), jax.jit(f)(a, b))


def test_captured_constants_become_parameters_and_scalars_become_literals() -> None:
    table = np.arange(12.0, dtype=np.float32).reshape(3, 4)
    closed = jax.make_jaxpr(lambda x: x @ jnp.asarray(table) * jnp.asarray(2.0, jnp.float32))(jnp.ones((2, 3)))
    result = jaxpr_to_module(closed)
    kinds = [s.kind for s in result.param_sources]
    assert kinds.count("const") == 1 and kinds.count("arg") == 1
    assert result.module.entry.params[0].name == "const0"


def test_nested_jit_called_twice_becomes_one_function() -> None:
    inner = jax.jit(lambda y: jnp.tanh(y) * 2)
    closed = jax.make_jaxpr(lambda x: inner(inner(x)))(jnp.ones(3))
    module = jaxpr_to_module(closed).module
    assert len(module.functions) == 2
    assert sum(op.opcode == "call" for op in module.entry.ops) == 2


def test_required_primitives_have_rules() -> None:
    required = """add sub mul div rem pow max min neg exp log tanh logistic sin cos sqrt rsqrt abs sign floor
    ceil round erf erfc eq ne lt le gt ge and or not xor integer_pow convert_element_type select_n
    broadcast_in_dim reshape transpose squeeze reduce_sum reduce_max reduce_min reduce_prod argmax
    argmin dot_general iota stop_gradient jit custom_jvp_call custom_vjp_call""".split()
    assert not [p for p in required if p not in RULES]


def test_sub_byte_integer_dtypes() -> None:
    f = lambda x: (x.astype(jnp.int4) + jnp.int4(1)).astype(jnp.float32) * 2  # noqa: E731
    x = jnp.arange(-4.0, 4.0)
    lowered = fusec.jit(f).lower(x)
    assert 'dtype = "i4", shape = [8], value = 1}' in lowered.as_text()
    assert_trees_close(fusec.jit(f)(x), jax.jit(f)(x))


_SHAPE_CASES = {
    "reshape_dimensions": lambda x: jax.lax.reshape(x, (6, 4), dimensions=(1, 0)),
    "tile": lambda x: jnp.tile(x, (2, 3)),
    "tile_adds_axes": lambda x: jnp.tile(x[0], (2, 2)),
    "dynamic_slice_literal": lambda x: jax.lax.dynamic_slice(x, (1, 2), (2, 3)),
    "dynamic_slice_clamped": lambda x: jax.lax.dynamic_slice(x, (3, 5), (2, 3)),
    "stack": lambda x: jnp.stack([x, x * 2], axis=1),
    "unstack": lambda x: sum(jnp.unstack(x, axis=1)),
    "pad_interior": lambda x: jax.lax.pad(x, -1.5, ((1, 2, 1), (0, 0, 2))),
    "pad_interior_negative_edges": lambda x: jax.lax.pad(x, 0.0, ((-2, 1, 2), (-1, -3, 1))),
    "pad_interior_size_one_axis": lambda x: jax.lax.pad(x[:1], 7.0, ((0, 1, 3), (1, 0, 0))),
    "broadcast_permuted_dims": lambda x: jax.lax.broadcast_in_dim(x, (6, 3, 4), (0, 2)[::-1]) * 2.0,
    "broadcast_permuted_three": lambda x: jax.lax.broadcast_in_dim(x.reshape(2, 2, 6), (6, 2, 5, 2), (3, 1, 0)),
    "mixed_dtype_dot": lambda x: jax.lax.dot_general(x.astype(jnp.bfloat16), x.T, (((1,), (0,)), ((), ())),
                                                     preferred_element_type=jnp.float32),
}


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("name", sorted(_SHAPE_CASES))
def test_shape_primitives_and_mixed_dots_have_rules(name: str, backend: str) -> None:
    fn = _SHAPE_CASES[name]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6)), jnp.float32)
    f = fusec.jit(fn, backend=backend)
    assert not f.lower(x).fallbacks
    np.testing.assert_allclose(np.asarray(f(x)), np.asarray(jax.jit(fn)(x)), rtol=2e-5, atol=2e-5)


def test_dynamic_slice_at_a_run_time_offset_falls_back_visibly() -> None:
    fn = lambda x: jax.lax.dynamic_slice(x, (jnp.argmax(x[0]), 0), (2, 3))  # noqa: E731
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6)), jnp.float32)
    low = fusec.jit(fn).lower(x)
    assert [f.primitive for f in low.fallbacks] == ["dynamic_slice"]
    np.testing.assert_allclose(fusec.jit(fn)(x), jax.jit(fn)(x))
