"""Flash-decoding (split-decode) and the low-bit KV cache (fusec.lowprec.KVCache)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusec
from fusec.ir import DType, LowBitType, TensorType
from fusec.lowprec import KVCache
from fusec.passes.cost import nbytes
from fusec.passes.decode_split import decode_chunks

SMOKE = ("test_decode_split_matches_jit",)


def attend(q, k, v, mask=None):
    """[B, H, Tq, D] queries over [B, H, Tk, D] keys and values; ``mask`` [Tk] hides keys."""
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1]).astype(np.float32)
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)


def _inputs(b, h, tq, tk, d, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, s) for k, s in zip(keys, ((b, h, tq, d), (b, h, tk, d), (b, h, tk, d)))]


def _attention_kernels(fn, *args, backend="pallas"):
    lowered = fusec.jit(fn, backend=backend, interpret=True).lower(*args)
    return [op for op in lowered.program.module.all_ops() if op.opcode == "kernel" and op.attr("kind") == "attention"]


def test_chunks_fill_the_gpu() -> None:
    # batch 1 x 32 heads over 4096 keys: 8 chunks of 512, 256 programs (>= 132 SMs).
    assert decode_chunks(32, 4096) == (8, 512)
    s, c = decode_chunks(4, 1000)
    assert s * c >= 1000 > (s - 1) * c and c % 128 == 0
    assert decode_chunks(1, 100) == (1, 128)  # one chunk: not split


@pytest.mark.parametrize("backend,tq,tk", [("pallas", 1, 1000), ("triton", 3, 512)])
def test_decode_split_matches_jit(backend: str, tq: int, tk: int) -> None:
    q, k, v = _inputs(1, 2, tq, tk, 64)
    f = fusec.jit(attend, backend=backend, interpret=True)
    (op,) = _attention_kernels(attend, q, k, v, backend=backend)
    s = int(op.attr("decode_split"))
    assert tuple(op.attr("grid"))[:2] == (2, s) and s == decode_chunks(2, tk)[0] > 1
    np.testing.assert_allclose(np.asarray(f(q, k, v)), np.asarray(jax.jit(attend)(q, k, v)), rtol=2e-5, atol=2e-5)


def test_decode_split_grid_at_llama_decode_shape() -> None:
    # Lowering only (no run): batch 1, 32 heads, KV 4096, d 128 -> grid (32, 8).
    q, k, v = (jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((1, 32, 1, 128), (1, 32, 4096, 128), (1, 32, 4096, 128)))
    (op,) = _attention_kernels(attend, q, k, v)
    grid = tuple(op.attr("grid"))
    assert grid[0] * grid[1] >= 132 and grid[:2] == (32, 8)


def test_decode_split_masked_chunks_and_grad() -> None:
    # A padding mask that hides whole chunks (their m_s is -inf), and jax.grad through the split.
    q, k, v = _inputs(1, 2, 1, 512, 32, seed=1)
    mask = jnp.arange(512) < 300
    f = fusec.jit(attend, backend="pallas", interpret=True)
    assert _attention_kernels(attend, q, k, v, mask)[0].attr("decode_split") == 4
    np.testing.assert_allclose(np.asarray(f(q, k, v, mask)), np.asarray(attend(q, k, v, mask)), rtol=2e-5, atol=2e-5)
    got = jax.grad(lambda q, v: jnp.sum(f(q, k, v, mask) ** 2), argnums=(0, 1))(q, v)
    want = jax.grad(lambda q, v: jnp.sum(attend(q, k, v, mask) ** 2), argnums=(0, 1))(q, v)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_long_queries_are_not_split() -> None:
    q, k, v = _inputs(1, 2, 32, 512, 32)
    (op,) = _attention_kernels(attend, q, k, v)
    assert op.attr("decode_split") is None


# -- the KV cache -------------------------------------------------------------------------------
def _errors(got, want) -> tuple[float, float, float]:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want)
    cos = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
    return float(err.max()), float(err.mean()), cos


# (bits, max abs error of the attention output, its cosine) on N(0, 1) keys/values, 200 tokens.
BOUNDS = {8: (0.005, 0.9999), 4: (0.06, 0.98), 2: (0.3, 0.8)}  # measured: 0.002/0.99998, 0.032/0.993, 0.17/0.86


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_cache_attention_error(bits: int) -> None:
    q, k, v = _inputs(1, 2, 1, 200, 64, seed=2)
    cache = jax.jit(lambda c, k, v: c.append(k, v))(KVCache.create(1, 2, 256, 64, bits, dtype=jnp.float32), k, v)
    assert int(cache.length) == 200
    step = {8: 1 / 255, 4: 1 / 15, 2: 1 / 3}[bits]
    for got, want in ((cache.keys(), k), (cache.values(), v)):
        span = float(np.max(np.asarray(want)) - np.min(np.asarray(want)))
        assert _errors(np.asarray(got)[:, :, :200], want)[0] <= step * span  # one code step of the range
    out = attend(q, cache.keys(), cache.values(), cache.mask())
    max_err, _, cos = _errors(out, attend(q, k, v))
    assert max_err <= BOUNDS[bits][0] and cos >= BOUNDS[bits][1]


def test_cache_exact_window_and_capacity() -> None:
    k, v = _inputs(1, 1, 1, 70, 32, seed=3)[1:]
    cache = KVCache.create(1, 1, 128, 32, 4, dtype=jnp.float32).append(k, v)
    window = np.asarray(cache.keys(exact_window=True))[:, :, 64:70]
    np.testing.assert_array_equal(window, np.asarray(k)[:, :, 64:70])  # the open group is exact
    with pytest.raises(ValueError, match="overflows its capacity"):
        cache.append(jnp.zeros((1, 1, 60, 32)), jnp.zeros((1, 1, 60, 32)))
    full = jax.jit(lambda c: c.append(jnp.ones((1, 1, 60, 32)), jnp.ones((1, 1, 60, 32))))(cache)
    assert int(full.length) == 130 and full.length > full.capacity  # under jit: dropped, counted
    np.testing.assert_array_equal(np.asarray(full.keys())[:, :, :64], np.asarray(cache.keys())[:, :, :64])


def test_cache_bad_inputs_name_the_argument() -> None:
    with pytest.raises(ValueError, match="bits must be one of"):
        KVCache.create(1, 1, 128, 32, 3)
    with pytest.raises(ValueError, match="capacity 100 is not a whole number of key_group"):
        KVCache.create(1, 1, 100, 32, 4)
    cache = KVCache.create(1, 2, 128, 32, 4)
    with pytest.raises(ValueError, match=r"k must be \[batch, kv_heads, tokens, head_dim\]"):
        cache.append(jnp.zeros((1, 3, 1, 32)), jnp.zeros((1, 2, 1, 32)))
    with pytest.raises(ValueError, match="v must be a float array"):
        cache.append(jnp.zeros((1, 2, 1, 32)), jnp.zeros((1, 2, 1, 32), jnp.int32))


def test_cache_is_a_pytree_under_vmap_and_scan() -> None:
    k, v = _inputs(2, 1, 1, 20, 32, seed=4)[1:]
    caches = jax.vmap(lambda k, v: KVCache.create(1, 1, 64, 32, 8, dtype=jnp.float32).append(k[None], v[None]))(k, v)
    assert caches.k_words.shape[0] == 2
    keys = jax.vmap(lambda c: c.keys())(caches)
    assert _errors(keys[:, 0, :, :20], k)[0] < 0.05

    def step(c, kv):
        return c.append(*kv), None

    kv = (jnp.moveaxis(k[:1], 2, 0), jnp.moveaxis(v[:1], 2, 0))  # 20 steps of one token
    cache, _ = jax.lax.scan(step, KVCache.create(1, 1, 64, 32, 8, dtype=jnp.float32), kv)
    assert int(cache.length) == 20 and _errors(cache.values()[:, :, :20], v[:1])[0] < 0.05


def attend_bf16(q, k, v, mask):
    """Model-style decode attention: f32 scores and softmax, probabilities cast to V's dtype."""
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * float(1 / np.sqrt(q.shape[-1]))
    s = jnp.where(mask, s, -jnp.inf)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1).astype(v.dtype), v)


def attend_cache(q, cache):
    return attend(q, cache.keys(), cache.values(), cache.mask())


@pytest.mark.parametrize("backend,bits", [("pallas", 4), ("triton", 2)])
def test_cache_decode_unpacks_in_the_kernel(backend: str, bits: int) -> None:
    q, k, v = _inputs(1, 2, 1, 400, 64, seed=6)
    cache = KVCache.create(1, 2, 512, 64, bits, dtype=jnp.float32).append(k, v)
    fn, args = attend_cache, (q, cache)
    (op,) = _attention_kernels(fn, *args, backend=backend)
    assert [str(v.type) for v in op.operands[1:3]] == [f"u{bits}g64z[512,128]", f"u{bits}gcz[64,1024]"]
    got = fusec.jit(fn, backend=backend, interpret=True)(*args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.jit(fn)(*args)), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("gpu_tiles", [pytest.param(False, marks=pytest.mark.slow), True])
def test_cache_decode_gqa_batch_and_gpu_tiles(gpu_tiles: bool) -> None:
    # Batch 2, 4 query heads over 2 KV heads (jnp.repeat), 2 queries, a bf16 cache; GPU tiles
    # (16 query rows, 64-key blocks) run in interpret mode too.
    from fusec.pipeline import resolve_pipeline

    def fn(q, cache):
        k, v = (jnp.repeat(x, 2, axis=1) for x in (cache.keys(), cache.values()))
        return attend_bf16(q, k, v, cache.mask())

    q = _inputs(2, 4, 2, 1, 64, seed=7)[0].astype(jnp.bfloat16)
    k, v = _inputs(2, 2, 1, 150, 64, seed=8)[1:]
    cache = KVCache.create(2, 2, 256, 64, 4).append(k, v)
    passes = resolve_pipeline(None, "pallas", interpret=False) if gpu_tiles else None
    f = fusec.jit(fn, backend="pallas", interpret=True, passes=passes)
    entry = f.lower(q, cache).program.module.entry
    (op,) = [o for o in entry.ops if o.opcode == "kernel" and o.attr("kind") == "attention"]
    assert tuple(op.attr("grid")) == (8, 2, 1) and op.attr("bk") == (64 if gpu_tiles else 32)
    assert str(op.operands[1].type) == "u4g64z[256,256]"
    got, want = np.asarray(f(q, cache), np.float32), np.asarray(jax.jit(fn)(q, cache), np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=4e-3)  # bf16 output


def test_cache_bytes_and_grid_at_llama_decode() -> None:
    # Batch 1, 32 heads, KV 4096, d 128: the cost model's bytes of the decode kernel reading the
    # int4 / int2 cache packed, against the same kernel on a bf16 cache (measured: 0.268x, 0.143x).
    b, h, t, d = 1, 32, 4096, 128
    spec = jax.ShapeDtypeStruct
    q = spec((b, h, 1, d), jnp.bfloat16)
    (base,) = _attention_kernels(attend_bf16, q, spec((b, h, t, d), jnp.bfloat16), spec((b, h, t, d), jnp.bfloat16),
                                 spec((t,), jnp.bool_))
    assert nbytes(TensorType(DType("bf16"), (b, h, t, d))) * 2 <= base.attr("bytes_read") < 1.01 * 2 * b * h * t * d * 2

    def fn(q, cache):
        return attend_bf16(q, cache.keys(), cache.values(), cache.mask())

    for bits, bound in ((4, 0.3), (2, 0.2)):
        cache = jax.eval_shape(lambda bits=bits: KVCache.create(b, h, t, d, bits))
        (op,) = _attention_kernels(fn, q, cache)
        assert isinstance(op.operands[1].type.elem, LowBitType) and isinstance(op.operands[2].type.elem, LowBitType)
        assert op.attr("bytes_read") / base.attr("bytes_read") <= bound
        grid = tuple(op.attr("grid"))
        assert grid[0] * grid[1] >= 132


def test_cache_decode_lowers_for_cuda_masked_and_compiles_for_sm90() -> None:
    from tests.test_bounds import check_masks, gpu

    cache = KVCache.create(1, 4, 1024, 128, 4)
    q = jnp.zeros((1, 4, 1, 128), jnp.bfloat16)
    fn = lambda q, cache: attend_bf16(q, cache.keys(), cache.values(), cache.mask())  # noqa: E731
    assert check_masks(gpu(fn), q, cache) >= 3  # the padded query rows: Q, O_s, m_s, l_s
    resources = gpu(fn).lower(q, cache).gpu_resources(90)
    assert any("decode" in r.name for r in resources) and all(r.spills == 0 for r in resources), resources
