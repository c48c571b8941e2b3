"""The benchmarked models in plain JAX, at any size: a GPT-2 block and a Llama block over
[batch, seq, d] activations, and an N-layer GPT-2 stack for the compile-time scaling rows."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _normal(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return (0.02 * jax.random.normal(key, shape)).astype(dtype)


def _layer_norm(x: jax.Array, g: jax.Array, b: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * g + b


def _rms_norm(x: jax.Array, g: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt((xf * xf).mean(-1, keepdims=True) + 1e-6)).astype(x.dtype) * g


def _attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """[b, s, h, e] each; causal."""
    s = q.shape[1]
    scores = jnp.einsum("bqhe,bkhe->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, jnp.finfo(q.dtype).min)
    return jnp.einsum("bhqk,bkhe->bqhe", jax.nn.softmax(scores, axis=-1), v)


def gpt2_params(key: jax.Array, d: int, dtype: Any = jnp.float32) -> dict:
    k = jax.random.split(key, 4)
    ones, zeros = jnp.ones(d, dtype), jnp.zeros(d, dtype)
    return {"ln1_g": ones, "ln1_b": zeros, "w_qkv": _normal(k[0], (d, 3 * d), dtype), "b_qkv": jnp.zeros(3 * d, dtype),
            "w_out": _normal(k[1], (d, d), dtype), "b_out": zeros, "ln2_g": ones, "ln2_b": zeros,
            "w_fc": _normal(k[2], (d, 4 * d), dtype), "b_fc": jnp.zeros(4 * d, dtype),
            "w_proj": _normal(k[3], (4 * d, d), dtype), "b_proj": zeros}


def gpt2_block(p: dict, x: jax.Array, heads: int) -> jax.Array:
    b, s, d = x.shape
    h = _layer_norm(x, p["ln1_g"], p["ln1_b"]) @ p["w_qkv"] + p["b_qkv"]
    q, k, v = (t.reshape(b, s, heads, d // heads) for t in jnp.split(h, 3, axis=-1))
    x = x + _attention(q, k, v).reshape(b, s, d) @ p["w_out"] + p["b_out"]
    h = jax.nn.gelu(_layer_norm(x, p["ln2_g"], p["ln2_b"]) @ p["w_fc"] + p["b_fc"])
    return x + h @ p["w_proj"] + p["b_proj"]


def gpt2_stack(layers: list[dict], x: jax.Array, heads: int) -> jax.Array:
    for p in layers:
        x = gpt2_block(p, x, heads)
    return x


def llama_params(key: jax.Array, d: int, kv_heads: int, heads: int, ff: int, dtype: Any = jnp.float32) -> dict:
    k = jax.random.split(key, 7)
    e = d // heads
    return {"norm1": jnp.ones(d, dtype), "norm2": jnp.ones(d, dtype), "wq": _normal(k[0], (d, d), dtype),
            "wk": _normal(k[1], (d, kv_heads * e), dtype), "wv": _normal(k[2], (d, kv_heads * e), dtype),
            "wo": _normal(k[3], (d, d), dtype), "w_gate": _normal(k[4], (d, ff), dtype),
            "w_up": _normal(k[5], (d, ff), dtype), "w_down": _normal(k[6], (ff, d), dtype)}


def _rotary(x: jax.Array) -> jax.Array:
    s, e = x.shape[1], x.shape[-1]
    freqs = 10000.0 ** (-jnp.arange(0, e // 2, dtype=jnp.float32) * 2.0 / e)
    angles = jnp.arange(s, dtype=jnp.float32)[:, None] * freqs[None, :]
    cos, sin = (f(angles)[None, :, None, :].astype(x.dtype) for f in (jnp.cos, jnp.sin))
    x1, x2 = x[..., : e // 2], x[..., e // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def llama_block(p: dict, x: jax.Array, heads: int, kv_heads: int) -> jax.Array:
    b, s, d = x.shape
    e = d // heads
    h = _rms_norm(x, p["norm1"])
    q = _rotary((h @ p["wq"]).reshape(b, s, heads, e))
    k = _rotary((h @ p["wk"]).reshape(b, s, kv_heads, e))
    v = (h @ p["wv"]).reshape(b, s, kv_heads, e)
    k, v = (jnp.repeat(t, heads // kv_heads, axis=2) for t in (k, v))
    x = x + _attention(q, k, v).reshape(b, s, d) @ p["wo"]
    h = _rms_norm(x, p["norm2"])
    return x + (jax.nn.silu(h @ p["w_gate"]) * (h @ p["w_up"])) @ p["w_down"]
