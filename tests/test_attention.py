"""Attention recognition and the flash-attention kernel (Pallas interpret mode)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusec

SMOKE = ("test_mha_matches_jit", "test_padding_mask")


def _pallas(fn):
    return fusec.jit(fn, backend="pallas", interpret=True)


def _inputs(*shapes, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(keys, shapes)]


def _kernels(lowered, kind=None):
    return [op for op in lowered.program.module.all_ops()
            if op.opcode == "kernel" and (kind is None or op.attr("kind") == kind)]


def _no_scores_in_entry(lowered, tq: int, tk: int, inputs: tuple = ()) -> None:
    """No value of the compiled program's entry holds a [Tq, Tk] plane (scores, probabilities,
    masks); values shaped like an input (Q, K, V and O when the head dim equals T) are not planes."""
    for op in lowered.program.module.entry.ops:
        for r in op.results:
            if tuple(r.type.shape) in inputs:
                continue
            shape = list(r.type.shape)
            if tq in shape:
                shape.remove(tq)
                assert tk not in shape, f"{r}: {r.type} in the entry: {op.opcode}"


def _check(fn, *args, tq: int, tk: int, n: int = 1, planes: bool = True, rtol=2e-5, atol=2e-5):
    """One attention kernel per attention, no score plane in the entry (unless an input is one:
    ``planes=False``), and jax.jit's result."""
    f = _pallas(fn)
    lowered = f.lower(*args)
    assert len(_kernels(lowered, "attention")) == n, lowered.as_text()
    if planes and tq > 1 and tk > 1:
        _no_scores_in_entry(lowered, tq, tk, tuple(tuple(np.shape(a)) for a in jax.tree.leaves(args)))
    np.testing.assert_allclose(np.asarray(f(*args), np.float32), np.asarray(jax.jit(fn)(*args), np.float32),
                               rtol=rtol, atol=atol)
    return lowered


def mha(q, k, v, causal=False):
    """[B, H, T, D] attention, jax.nn.softmax, scale after the dot, tril mask."""
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1]).astype(np.float32)
    if causal:
        t, u = q.shape[2], k.shape[2]
        s = jnp.where(jnp.tril(jnp.ones((t, u), bool)), s, -1e9)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)


CASES = list(itertools.product((1, 7, 33), (32, 64), (False, True))) + \
    list(itertools.product((128, 1000, 2048), (64, 128, 256), (False, True)))
# The default run samples the matrix; the slow run takes all of it.
DEFAULT = [(1, 32, True), (7, 64, False), (33, 32, True), (33, 64, False), (128, 128, True), (1000, 64, False)]


@pytest.mark.parametrize("t,d,causal", [c if c in DEFAULT else pytest.param(*c, marks=pytest.mark.slow)
                                        for c in CASES])
def test_mha_matches_jit(t: int, d: int, causal: bool) -> None:
    q, k, v = _inputs((2, 2, t, d), (2, 2, t, d), (2, 2, t, d))
    lowered = _check(lambda q, k, v: mha(q, k, v, causal), q, k, v, tq=t, tk=t)
    (op,) = _kernels(lowered, "attention")
    assert op.attr("causal") == (causal and t > 1)
    assert op.attr("scale") == pytest.approx(1 / np.sqrt(d))


def test_hand_softmax_scaled_query_bthd_layout() -> None:
    def attn(q, k, v):
        s = jnp.einsum("bqhd,bkhd->bhqk", q * 0.125, k)
        e = jnp.exp(s - s.max(-1, keepdims=True))
        return jnp.einsum("bhqk,bkhd->bqhd", e / e.sum(-1, keepdims=True), v)

    q, k, v = _inputs((2, 33, 3, 32), (2, 40, 3, 32), (2, 40, 3, 16))
    _check(attn, q, k, v, tq=33, tk=40)


def test_dot_product_attention() -> None:
    q, k, v = _inputs((1, 33, 2, 32), (1, 33, 2, 32), (1, 33, 2, 32))
    _check(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True), q, k, v, tq=33, tk=33)


def test_padding_mask() -> None:
    def attn(q, k, v, mask):
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.2
        s = jnp.where(mask[:, None, None, :], s, jnp.finfo(s.dtype).min)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)

    q, k, v = _inputs((2, 2, 7, 32), (2, 2, 40, 32), (2, 2, 40, 32))
    mask = jnp.arange(40)[None, :] < jnp.array([[29], [40]])
    lowered = _check(attn, q, k, v, mask, tq=7, tk=40)
    (op,) = _kernels(lowered, "attention")
    assert op.attr("has_bias") and not op.attr("causal")


def test_gqa_by_repeat_with_bias() -> None:
    def attn(q, k, v, bias):
        k, v = jnp.repeat(k, 2, axis=1), jnp.repeat(v, 2, axis=1)
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k) / 8.0 + bias
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)

    q, k, v, bias = _inputs((1, 4, 33, 64), (1, 2, 33, 64), (1, 2, 33, 64), (4, 33, 33))
    lowered = _check(attn, q, k, v, bias, tq=33, tk=33, planes=False)  # the bias is a [H, T, T] input
    (op,) = _kernels(lowered, "attention")
    # The kernel reads the unrepeated key/value heads: no repeat is left to run.
    assert op.attr("gqa_group") == 2 and op.attr("has_bias")
    assert not [o for o in lowered.program.module.entry.ops if o.opcode == "broadcast"]


def test_mqa_bthd_layout() -> None:
    def attn(q, k, v):  # one key/value head for all query heads, [B, T, H, D]
        k, v = (jnp.broadcast_to(t, (t.shape[0], t.shape[1], q.shape[2], t.shape[3])) for t in (k, v))
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)

    q, k, v = _inputs((2, 33, 4, 32), (2, 33, 1, 32), (2, 33, 1, 32))
    lowered = _check(attn, q, k, v, tq=33, tk=33)
    (op,) = _kernels(lowered, "attention")
    assert op.attr("gqa_group") == 4 and op.attr("causal")


def test_bias_laid_out_keys_first() -> None:
    """A [Tk, Tq] bias transposed in: XLA transposes it, the kernel reads the result."""
    def attn(q, k, v, bias):
        return jax.nn.softmax(jnp.einsum("hqd,hkd->hqk", q, k) + bias.T, axis=-1) @ v

    q, k, v, bias = _inputs((2, 7, 32), (2, 9, 32), (2, 9, 32), (9, 7))
    _check(attn, q, k, v, bias, tq=7, tk=9, planes=False)


def test_sliding_window_with_inf_mask() -> None:
    """Rows whose first key blocks are all -inf (a window far from the start) stay finite."""
    def attn(q, k, v):
        t = q.shape[1]
        i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
        s = jnp.where((j <= i) & (j > i - 8), jnp.einsum("hqd,hkd->hqk", q, k), -jnp.inf)
        return jax.nn.softmax(s, axis=-1) @ v

    q, k, v = _inputs((2, 70, 32), (2, 70, 32), (2, 70, 32))
    _check(attn, q, k, v, tq=70, tk=70)


def test_bfloat16() -> None:
    q, k, v = _inputs((1, 2, 33, 64), (1, 2, 33, 64), (1, 2, 33, 64), dtype=jnp.bfloat16)
    _check(lambda q, k, v: mha(q, k, v, True), q, k, v, tq=33, tk=33, rtol=2e-2, atol=2e-2)


def test_grad_through_attention() -> None:
    q, k, v = _inputs((1, 2, 7, 32), (1, 2, 7, 32), (1, 2, 7, 32))

    def loss(q, k, v):
        return jnp.sum(mha(q, k, v, True) ** 2)

    want = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    # grad of the fused function (fused backward kernels: tests/test_attention_grad.py), and
    # fusec.jit of the gradient program (the post-AD jaxpr: its attention backward is XLA's).
    fused = _pallas(lambda q, k, v: mha(q, k, v, True))
    outside = jax.grad(lambda q, k, v: jnp.sum(fused(q, k, v) ** 2), argnums=(0, 1, 2))(q, k, v)
    inside = _pallas(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for got in (outside, inside):
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)
    # The forward pass under grad is still one attention kernel.
    fwd = _pallas(lambda q, k, v: jax.value_and_grad(loss)(q, k, v)[0])
    assert len(_kernels(fwd.lower(q, k, v), "attention")) >= 1


def test_unrecognised_forms_stay_correct() -> None:
    """Probabilities used twice, or a softmax over the query axis: no attention kernel, the same
    result."""
    def returns_probs(q, k, v):
        p = jax.nn.softmax(jnp.einsum("hqd,hkd->hqk", q, k), axis=-1)
        return p @ v, p

    def query_axis(q, k, v):
        return jax.nn.softmax(jnp.einsum("hqd,hkd->hqk", q, k), axis=-2) @ v

    q, k, v = _inputs((2, 7, 32), (2, 7, 32), (2, 7, 32))
    for fn in (returns_probs, query_axis):
        f = _pallas(fn)
        assert not _kernels(f.lower(q, k, v), "attention")
        for got, want in zip(jax.tree.leaves(f(q, k, v)), jax.tree.leaves(jax.jit(fn)(q, k, v))):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_two_layers_share_one_mask() -> None:
    def two(q, k, v):
        t = q.shape[2]
        causal = jnp.tril(jnp.ones((t, t), bool))
        out = q
        for _ in range(2):
            s = jnp.where(causal, jnp.einsum("bhqd,bhkd->bhqk", out, k) * 0.1, -1e9)
            out = jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)
        return out

    q, k, v = _inputs((1, 2, 33, 32), (1, 2, 33, 32), (1, 2, 33, 32))
    _check(two, q, k, v, tq=33, tk=33, n=2)


@pytest.mark.parametrize("t,d", [(1000, 64), pytest.param(1000, 128, marks=pytest.mark.slow)])
def test_cuda_lowering_masks_at_1000(t: int, d: int) -> None:
    from tests.test_bounds import check_masks, gpu

    q = jnp.zeros((1, 2, t, d), jnp.bfloat16)
    # Q (query tail), K and V (key tail) and O (query tail) overhang their blocks.
    assert check_masks(gpu(lambda q, k, v: mha(q, k, v, True)), q, q, q) >= 4


def test_gpu_tiles_match_in_interpret_mode() -> None:
    """The GPU tiling (64 x 64 blocks: several query blocks and key steps, partial last ones) runs
    the same kernel in interpret mode; with a padding mask and a causal mask."""
    from fusec.pipeline import resolve_pipeline

    def attn(q, k, v, mask):
        t = q.shape[2]
        keep = jnp.tril(jnp.ones((t, t), bool)) & mask[:, None, None, :]
        s = jnp.where(keep, jnp.einsum("bhqd,bhkd->bhqk", q, k) * 0.125, -1e9)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)

    q, k, v = _inputs((2, 1, 100, 32), (2, 1, 100, 32), (2, 1, 100, 32))
    mask = jnp.arange(100)[None, :] < jnp.array([[70], [100]])
    passes = resolve_pipeline(None, "pallas", interpret=False)
    f = fusec.jit(attn, backend="pallas", interpret=True, passes=passes)
    (op,) = _kernels(f.lower(q, k, v, mask), "attention")
    assert op.attr("grid") == (2, 2, 1) and op.attr("bk") == 64
    np.testing.assert_allclose(f(q, k, v, mask), jax.jit(attn)(q, k, v, mask), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["quickstart", "llama_nnx", *(pytest.param(n, marks=pytest.mark.slow) for n in
                                                           ("linen_block", "equinox_block", "haiku_block"))])
def test_examples_have_one_attention_kernel(name: str) -> None:
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    if name != "quickstart":
        pytest.importorskip({"llama_nnx": "flax", "linen_block": "flax", "equinox_block": "equinox",
                             "haiku_block": "haiku"}[name])
    mod = importlib.import_module(name)
    fn, args = (mod.gpt2_block, mod.example_inputs()) if name == "quickstart" else (mod.forward, mod.example_inputs())
    # 24 tokens: a length no head or model width shares, so a [T, T] plane cannot hide.
    i = 0 if name == "quickstart" else 1
    x = jnp.concatenate([args[i], args[i][..., :8, :]], axis=-2)
    args = (x, args[1]) if i == 0 else (args[0], x)
    lowered = _pallas(fn).lower(*args)
    assert len(_kernels(lowered, "attention")) == 1
    _no_scores_in_entry(lowered, x.shape[-2], x.shape[-2])


def test_cost_is_q_k_v_and_o_at_2048() -> None:
    """The kernel's modeled bytes at T = 2048, d_head = 64: Q, K, V and O once each (K and V of a
    batch-head are re-read by every query block, from L2: not counted)."""
    def attn(q, k, v):  # bfloat16 throughout (a weakly typed scale)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=0.125)

    q = jax.ShapeDtypeStruct((1, 2048, 4, 64), jnp.bfloat16)
    lowered = _pallas(attn).lower(q, q, q)
    (op,) = _kernels(lowered, "attention")
    qkvo = 4 * (4 * 2048 * 64 * 2)
    assert int(op.attr("bytes_read")) + int(op.attr("bytes_written")) <= 1.2 * qkvo
    # Causal block skipping: query block i of 32 (64 rows) visits key blocks 0..i, 528 of 1024.
    assert int(op.attr("flops")) == 2 * 4 * 2048 * 2048 * (64 + 64) * sum(range(1, 33)) // 32**2
