"""``jax.grad`` through a recognised attention runs fused backward kernels (FlashAttention-2's
``pre``, ``dkv`` and ``dq``): gradients match ``jax.grad`` of the plain function, and no [T, T]
array is left anywhere in the gradient's jaxpr (T = 130 or 33: a length no other axis has)."""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusec
from fusec.runtime.jax_internals import triton_kernels_in
from fusec.runtime.ttir import memory_accesses

SMOKE = ("test_grad_matches_jax", "test_no_score_plane_in_the_gradient")


def _inputs(*shapes, seed=0):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes)]


def mha(q, k, v, causal=False):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1]).astype(np.float32)
    if causal:
        s = jnp.where(jnp.tril(jnp.ones((q.shape[2], k.shape[2]), bool)), s, -1e9)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)


def _walk(jaxpr, out):
    for eqn in jaxpr.eqns:
        out.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _walk(getattr(sub, "jaxpr", sub), out)
    return out


def _kernels(jaxpr) -> list[str]:
    return [eqn.params["spec"].name for eqn in _walk(jaxpr.jaxpr, []) if eqn.primitive.name == "fusec_kernel"]


def _planes(jaxpr, t: int) -> list[str]:
    """Values of the jaxpr (nested ones too) with two axes of length ``t``."""
    return [f"{eqn.primitive.name}: {v.aval}" for eqn in _walk(jaxpr.jaxpr, []) for v in eqn.outvars
            if list(getattr(v.aval, "shape", ())).count(t) >= 2]


def _check_grad(fn, args, argnums, backend="pallas", rtol=2e-4, atol=2e-5):
    """Gradients of ``sum(fn(...) * w)`` by fusec and by JAX, compared; returns the fused jaxpr."""
    w = _inputs(jax.eval_shape(fn, *args).shape, seed=7)[0]

    def loss(*a):
        return jnp.sum(fn(*a) * w)

    fused = fusec.jit(loss, backend=backend, interpret=True)
    grad = jax.grad(fused, argnums=argnums)
    got = jax.jit(grad)(*args)
    want = jax.jit(jax.grad(loss, argnums=argnums))(*args)
    for g, x in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(x), rtol=rtol, atol=atol)
    return jax.make_jaxpr(grad)(*args)


CASES = [(1, False), (7, True), (33, False), (130, True), (7, False), (33, True), (130, False)]
DEFAULT = CASES[:4]


@pytest.mark.parametrize("t,causal", [c if c in DEFAULT else pytest.param(*c, marks=pytest.mark.slow) for c in CASES])
def test_grad_matches_jax(t: int, causal: bool) -> None:
    q, k, v = _inputs((1, 2, t, 32), (1, 2, t, 32), (1, 2, t, 32))
    jaxpr = _check_grad(lambda q, k, v: mha(q, k, v, causal), (q, k, v), (0, 1, 2))
    kernels = _kernels(jaxpr)
    assert sum(n.endswith((".pre", ".dkv", ".dq")) for n in kernels) == 3, kernels


def test_no_score_plane_in_the_gradient() -> None:
    """jax.jit(jax.grad(fusec.jit(loss))): the forward with the log-sum-exp and the three backward
    kernels, and no [T, T] value anywhere (the same function under jax.grad alone has several)."""
    t = 130
    q, k, v = _inputs((1, 2, t, 32), (1, 2, t, 32), (1, 2, t, 32))

    def loss(q, k, v):
        return jnp.sum(mha(q, k, v, True) ** 2)

    jaxpr = jax.make_jaxpr(jax.jit(jax.grad(fusec.jit(loss, backend="pallas", interpret=True), argnums=(0, 1, 2))))(
        q, k, v)
    assert _planes(jaxpr, t) == []
    assert _planes(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v), t)  # the check can fail
    names = _kernels(jaxpr)
    assert [n for n in names if ".attn" in n] == ["loss.attn", "loss.attn.pre", "loss.attn.dkv", "loss.attn.dq"]


def test_padding_mask_and_jvp() -> None:
    def attn(q, k, v, mask):
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.2
        s = jnp.where(mask[:, None, None, :], s, jnp.finfo(s.dtype).min)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)

    q, k, v = _inputs((2, 2, 7, 32), (2, 2, 40, 32), (2, 2, 40, 32))
    mask = jnp.arange(40)[None, :] < jnp.array([[29], [40]])
    jaxpr = _check_grad(attn, (q, k, v, mask), (0, 1, 2))
    assert any(n.endswith(".dq") for n in _kernels(jaxpr))
    # jax.jvp of the fused function (the linear primitive evaluated forwards) agrees too.
    fused = fusec.jit(attn, backend="pallas", interpret=True)
    tangents = tuple(_inputs((2, 2, 7, 32), (2, 2, 40, 32), (2, 2, 40, 32), seed=5))
    got = jax.jvp(lambda q, k, v: fused(q, k, v, mask), (q, k, v), tangents)[1]
    want = jax.jvp(lambda q, k, v: attn(q, k, v, mask), (q, k, v), tangents)[1]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-5)


def test_gqa_bthd_layout_sums_the_group() -> None:
    """Eight query heads share two key/value heads ([B, T, H, D], causal, dot_product_attention):
    dK and dV add up over each group."""
    def attn(q, k, v):
        k, v = jnp.repeat(k, 4, axis=2), jnp.repeat(v, 4, axis=2)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)

    q, k, v = _inputs((1, 33, 8, 32), (1, 33, 2, 32), (1, 33, 2, 32))
    jaxpr = _check_grad(attn, (q, k, v), (0, 1, 2))
    assert _planes(jaxpr, 33) == []


def test_softcap_and_sliding_window() -> None:
    """A tanh soft-cap and a -inf sliding-window mask (both loops skip the blocks outside the band)."""
    def attn(q, k, v):
        t = q.shape[1]
        i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
        s = 30.0 * jnp.tanh(jnp.einsum("hqd,hkd->hqk", q, k) / 30.0)
        return jax.nn.softmax(jnp.where((j <= i) & (j > i - 40), s, -jnp.inf), axis=-1) @ v

    q, k, v = _inputs((2, 130, 32), (2, 130, 32), (2, 130, 32))
    _check_grad(attn, (q, k, v), (0, 1, 2))
    grad = next(iter(fusec.jit(attn, backend="pallas", interpret=True).lower(q, k, v).program.kernels.values())
                ).attention_grad()
    for spec in (grad.forward, grad.dkv, grad.dq):
        assert "bounded = true" in spec.tile_program


def test_custom_rules_keep_the_original_derivative() -> None:
    """A custom_jvp (relu) the IR inlines: the derivative is the original jaxpr's, with a warning."""
    def attn(q, k, v):
        return jax.nn.relu(mha(q, k, v, True))

    q, k, v = _inputs((1, 2, 7, 32), (1, 2, 7, 32), (1, 2, 7, 32))
    with pytest.warns(UserWarning, match=r"custom-derivative rules \(relu\)"):
        jaxpr = _check_grad(attn, (q, k, v), (0, 1, 2))
    assert not any(n.endswith(".dq") for n in _kernels(jaxpr))


def test_stop_gradient_keeps_the_original_derivative() -> None:
    """A stop_gradient on V (not a softmax's shift): V gets no gradient, as under jax.grad."""
    def attn(q, k, v):
        return mha(q, k, jax.lax.stop_gradient(v), True)

    q, k, v = _inputs((1, 2, 7, 32), (1, 2, 7, 32), (1, 2, 7, 32))
    with pytest.warns(UserWarning, match="stop_gradient"):
        jaxpr = _check_grad(attn, (q, k, v), (0, 1, 2))
    assert not any(n.endswith(".dq") for n in _kernels(jaxpr))


def test_bias_gradient_falls_back_visibly() -> None:
    """A bias that needs a gradient: the reference's VJP, with a warning; one that does not: fused."""
    def attn(q, k, v, bias):
        s = jnp.einsum("hqd,hkd->hqk", q, k) / 8.0 + bias
        return jax.nn.softmax(s, axis=-1) @ v

    q, k, v, bias = _inputs((2, 9, 32), (2, 9, 32), (2, 9, 32), (2, 9, 9))
    with pytest.warns(UserWarning, match="bias or other side input needs a gradient"):
        _check_grad(attn, (q, k, v, bias), (0, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jaxpr = _check_grad(attn, (q, k, v, bias), (0, 1, 2))
    assert any(n.endswith(".dkv") for n in _kernels(jaxpr))


def _tiny_loss():
    def loss(q, k, v):
        return jnp.sum(mha(q, k, v, True) ** 2)

    return loss, fusec.jit(loss, backend="pallas", interpret=True), _inputs((1, 1, 5, 4), (1, 1, 5, 4), (1, 1, 5, 4))


def test_vmap_of_grad() -> None:
    loss, fused, (q, k, v) = _tiny_loss()
    qs = jnp.stack([q, 2 * q])
    np.testing.assert_allclose(jax.vmap(lambda q: jax.grad(fused)(q, k, v))(qs),
                               jax.vmap(lambda q: jax.grad(loss)(q, k, v))(qs), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_hessian() -> None:
    """Second derivatives go through the reference VJP of the fused pieces: exact."""
    loss, fused, (q, k, v) = _tiny_loss()
    np.testing.assert_allclose(jax.hessian(fused)(q, k, v), jax.hessian(loss)(q, k, v), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_gpt2_example_gradient() -> None:
    """The quickstart GPT-2 block's parameter gradient: fused backward, no [T, T] value (T = 24)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    import quickstart

    x, params = quickstart.example_inputs()
    x = jnp.concatenate([x, x[:8]], axis=0)
    jaxpr = _check_grad(quickstart.gpt2_block, (x, params), (0, 1), rtol=1e-4, atol=1e-4)
    assert _planes(jaxpr, 24) == []
    assert sum(n.endswith((".pre", ".dkv", ".dq")) for n in _kernels(jaxpr)) == 3


def test_triton_interpreter() -> None:
    q, k, v = _inputs((1, 2, 40, 32), (1, 2, 40, 32), (1, 2, 40, 32))
    jaxpr = _check_grad(lambda q, k, v: mha(q, k, v, True), (q, k, v), (0, 1, 2), backend="triton")
    assert any(n.endswith(".dq") for n in _kernels(jaxpr))


def _ident(name: str) -> str:
    return "k_" + "".join(ch if ch.isalnum() else "_" for ch in name)


def test_backward_kernels_mask_every_overhanging_access() -> None:
    """Lowered for cuda (Pallas's Triton lowering, GPU tiles of 64 at T = 130 and head dim 48):
    every access of an array some block overhangs is masked, in all four kernels."""
    q, k, v = _inputs((1, 2, 130, 48), (1, 2, 130, 48), (1, 2, 130, 48))

    def loss(q, k, v):
        return jnp.sum(mha(q, k, v, True) ** 2)

    fused = fusec.jit(loss, backend="pallas", interpret=True)
    lowered = jax.jit(jax.grad(fused, argnums=(0, 1, 2))).trace(q, k, v).lower(lowering_platforms=("cuda",))
    grad = next(iter(fused.lower(q, k, v).program.kernels.values())).attention_grad()
    specs = {_ident(s.name): s.for_gpu() for s in (grad.forward, grad.pre, grad.dkv, grad.dq)}
    seen = set()
    for ttir, _ in triton_kernels_in(lowered):
        name = re.search(r"tt\.func (?:public )?@([\w$.]+)", ttir).group(1)
        if name not in specs:
            continue
        seen.add(name)
        spec = specs[name]
        accesses = memory_accesses(ttir)
        assert accesses
        for a in accesses:
            assert a.argument is not None, f"{name}: cannot trace {a.line}"
            if a.argument in spec.masked_refs:
                assert a.masked, f"kernel {spec.name}: unmasked {a.kind} of argument {a.argument}: {a.line}"
        assert spec.masked_refs  # T = 130 and head dim 48 overhang their blocks of 64
    assert len(seen) == 4, seen


@pytest.mark.parametrize("d", [64, pytest.param(128, marks=pytest.mark.slow)])
def test_backward_kernels_compile_for_sm90_without_spills(d: int, tmp_path, monkeypatch) -> None:
    """The Triton backend's backward kernels (GPU tiles), compiled for sm_90: 0 spills."""
    monkeypatch.setenv("TRITON_HOME", str(tmp_path))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    from fusec.runtime.triton_compile import compile_triton_kernel
    from tests.test_triton_backend import _check_source_masks

    q, k, v = _inputs((1, 2, 130, d), (1, 2, 130, d), (1, 2, 130, d))
    fused = fusec.jit(lambda q, k, v: mha(q, k, v, True), backend="triton", interpret=True)
    grad = next(iter(fused.lower(q, k, v).program.kernels.values())).attention_grad()
    for spec in (grad.forward, grad.pre, grad.dkv, grad.dq):
        gpu = spec.for_gpu()
        assert gpu is not None and gpu.backend == "triton", spec.name
        _check_source_masks(gpu.backend_kernel)
        resources = compile_triton_kernel(gpu.backend_kernel, 90, sass=False).resources
        assert resources.spills == 0, (spec.name, resources)


@pytest.mark.parametrize("roles,shape,offset", [
    ((("b", 4, 2), ("k", 1, 5), ("b", 1, 4), ("d", 1, 3)), (2, 5, 4, 3), 0),  # [B, T, H, D]
    ((("1", 1, 1), ("b", 4, 2), ("k", 1, 5), ("d", 1, 3)), (1, 2, 5, 3), 0),  # GQA: 8 heads on 2
    ((("k", 1, 5), ("m", 1, 8)), (5, 3 * 8 * 4), 8),  # the K part of a fused QKV array
    ((("b", 2, 4), ("k", 1, 5), ("m", 1, 2)), (4, 5, 2 * 4), 0),  # merged heads, 2 of a group of 2
])
def test_gradient_layouts_agree_with_the_scatter(roles, shape, offset) -> None:
    from fusec.codegen.attention_grad import GradMap
    from fusec.runtime.attention_vjp import _relayout, _scatter

    depth = 4 if any(r[0] == "m" for r in roles) else 3
    g = GradMap("dk", 0, roles, offset, depth)
    c = _inputs((8, 5, depth))[0]
    fast = _relayout(c, g, shape)
    assert fast is not None
    np.testing.assert_allclose(fast, _scatter(c, g, shape), rtol=1e-6, atol=1e-6)
