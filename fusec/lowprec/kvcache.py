"""A low-bit KV cache for decoding: ``KVCache`` (a registered pytree) with int8/int4/int2 codes.

Keys are quantized per channel in groups of ``key_group`` tokens, values per token in groups of
``value_group`` channels (KIVI's split: key outliers sit in channels, value errors stay per
token), asymmetric: ``x ~ (code - zero) * scale`` with ``scale_dtype`` scales and zero-points.
Storage is fusec's packed layout (:mod:`fusec.lowprec.packing`) with the packed axis first, so
``keys()`` and ``values()`` are one ``fusec_dequantize`` each, as quantized weights are:

- keys: codes ``[T, B*H*D]`` (groups run along the tokens), dequantized, then viewed [B, H, T, D];
- values: codes ``[D, B*H*T]`` (groups run along the channels), dequantized, then viewed.

The capacity ``T`` is fixed and ``length`` is an array, so ``append`` works under ``jit`` and
``lax.scan``. A key group still being filled keeps its tokens in full precision (the residual
window, ``key_group`` tokens): each append re-quantizes that group from them, so the codes are
always whole and a finished group is quantized from exact keys. ``keys(exact_window=True)``
reads the window's tokens at full precision instead (a select after the dequantize).

Appending past the capacity raises ``ValueError`` when the length is known (outside ``jit``);
under ``jit`` tokens past the capacity are dropped and ``length`` keeps counting, so
``cache.length > cache.capacity`` tells.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusec.lowprec.qarray import dequantize_p

BITS = (2, 4, 8)
SCALE_DTYPES = ("bf16", "f32")
_JNP = {"bf16": jnp.bfloat16, "f32": jnp.float32}


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True)
class KVCache:
    """Packed key and value codes of one attention layer, ``[batch, kv_heads, capacity, head_dim]``."""

    k_words: Any  # u32 [T * bits / 32, B*H*D]
    k_scale: Any  # [T / key_group, B*H*D]
    k_zero: Any
    v_words: Any  # u32 [D * bits / 32, B*H*T]
    v_scale: Any  # [D / value_group, B*H*T]
    v_zero: Any
    window: Any  # [B, H, key_group, D] the current key group's tokens, full precision
    length: Any  # i32 []
    bits: int
    shape: tuple[int, int, int, int]  # (B, H, T, D)
    key_group: int
    value_group: int
    dtype: str

    def tree_flatten(self) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        return ((self.k_words, self.k_scale, self.k_zero, self.v_words, self.v_scale, self.v_zero, self.window,
                 self.length), (self.bits, self.shape, self.key_group, self.value_group, self.dtype))

    @classmethod
    def tree_unflatten(cls, aux: tuple[Any, ...], children: tuple[Any, ...]) -> KVCache:
        return cls(*children, *aux)

    @classmethod
    def create(cls, batch: int, kv_heads: int, capacity: int, head_dim: int, bits: int = 4, *,
               key_group: int = 64, value_group: int | None = None, scale_dtype: str = "bf16",
               dtype: Any = jnp.bfloat16) -> KVCache:
        """An empty cache. ``capacity`` must be a multiple of ``key_group`` and ``head_dim`` of
        ``value_group`` (default: ``head_dim``, one group per token), both groups of whole
        32-bit words (a multiple of 32 / bits)."""
        for name, v in (("batch", batch), ("kv_heads", kv_heads), ("capacity", capacity), ("head_dim", head_dim)):
            _check(isinstance(v, int) and v > 0, f"{name} must be a positive int, got {v!r}")
        _check(bits in BITS, f"bits must be one of {BITS}, got {bits!r}")
        value_group = head_dim if value_group is None else value_group
        per_word = 32 // bits
        for name, g, n, of in (("key_group", key_group, capacity, "capacity"),
                               ("value_group", value_group, head_dim, "head_dim")):
            _check(isinstance(g, int) and g > 0 and g % per_word == 0,
                   f"{name} must be a positive multiple of {per_word} (whole 32-bit words of {bits}-bit codes), "
                   f"got {g!r}")
            _check(n % g == 0, f"{of} {n} is not a whole number of {name} = {g}")
        _check(scale_dtype in SCALE_DTYPES, f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype!r}")
        dt = jnp.dtype(dtype)
        _check(jnp.issubdtype(dt, jnp.floating), f"dtype must be a float dtype, got {dt}")
        n_k, n_v = batch * kv_heads * head_dim, batch * kv_heads * capacity
        sd = _JNP[scale_dtype]
        return cls(jnp.zeros((capacity * bits // 32, n_k), jnp.uint32), jnp.ones((capacity // key_group, n_k), sd),
                   jnp.zeros((capacity // key_group, n_k), sd), jnp.zeros((head_dim * bits // 32, n_v), jnp.uint32),
                   jnp.ones((head_dim // value_group, n_v), sd), jnp.zeros((head_dim // value_group, n_v), sd),
                   jnp.zeros((batch, kv_heads, key_group, head_dim), dt), jnp.zeros((), jnp.int32), bits,
                   (batch, kv_heads, capacity, head_dim), key_group, value_group, dt.name)

    @property
    def capacity(self) -> int:
        return self.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes the attention reads: codes, scales and zero-points (not the residual window)."""
        return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in
                       (self.k_words, self.k_scale, self.k_zero, self.v_words, self.v_scale, self.v_zero)))

    # -- reading ----------------------------------------------------------------------------
    def _dequantize(self, words: Any, scale: Any, zero: Any, shape: tuple[int, int], group: int) -> Any:
        return dequantize_p.bind(words, scale, zero, family="uint", bits=self.bits, layout=None, lut=None,
                                 group=group, shape=shape, dtype=self.dtype, has_zeros=True)

    def keys(self, exact_window: bool = False) -> jax.Array:
        """[B, H, T, D] keys (slots at or past ``length`` hold zeros: mask them with :meth:`mask`)."""
        b, h, t, d = self.shape
        k = self._dequantize(self.k_words, self.k_scale, self.k_zero, (t, b * h * d), self.key_group)
        k = k.reshape(t, b, h, d).transpose(1, 2, 0, 3)
        if not exact_window:
            return k
        g = self.key_group
        start = (self.length // g) * g
        pos = jnp.arange(t)
        slot = jnp.clip(pos - start, 0, g - 1)
        inside = (pos >= start) & (pos < self.length)
        return jnp.where(inside[None, None, :, None], self.window[:, :, slot, :], k)

    def values(self) -> jax.Array:
        """[B, H, T, D] values (zeros past ``length``)."""
        b, h, t, d = self.shape
        v = self._dequantize(self.v_words, self.v_scale, self.v_zero, (d, b * h * t), self.value_group)
        return v.reshape(d, b, h, t).transpose(1, 2, 3, 0)

    def mask(self) -> jax.Array:
        """bool [T]: the slots holding tokens."""
        return jnp.arange(self.capacity) < self.length

    # -- writing ----------------------------------------------------------------------------
    def append(self, k: Any, v: Any) -> KVCache:
        """The cache with ``k``, ``v`` ([B, H, n, D], or [B, H, D] for one token) after its tokens."""
        b, h, t, d = self.shape
        k, v = jnp.asarray(k), jnp.asarray(v)
        for name, x in (("k", k), ("v", v)):
            if x.ndim == 3:
                x = x[:, :, None]
            _check(x.ndim == 4 and x.shape[:2] == (b, h) and x.shape[3] == d,
                   f"{name} must be [batch, kv_heads, tokens, head_dim] = [{b}, {h}, n, {d}] (or without the "
                   f"tokens axis), got {list(x.shape)}")
            _check(jnp.issubdtype(x.dtype, jnp.floating), f"{name} must be a float array, got {x.dtype}")
        k = k[:, :, None] if k.ndim == 3 else k
        v = v[:, :, None] if v.ndim == 3 else v
        _check(k.shape[2] == v.shape[2], f"k has {k.shape[2]} tokens but v has {v.shape[2]}")
        n = k.shape[2]
        try:
            known = int(self.length)
        except (TypeError, jax.errors.ConcretizationTypeError):
            known = None
        if known is not None:
            _check(known + n <= t, f"appending {n} token(s) to a cache holding {known} of {t} overflows its "
                                   "capacity")

        def one(i: Any, cache: KVCache) -> KVCache:
            return cache._append_one(k[:, :, i], v[:, :, i])

        return jax.lax.fori_loop(0, n, one, self)

    def _append_one(self, k: Any, v: Any) -> KVCache:
        b, h, t, d = self.shape
        g, pos = self.key_group, self.length
        ok = pos < t
        slot = pos % g
        window = jnp.where(slot == 0, jnp.zeros_like(self.window), self.window)
        window = window.at[:, :, slot].set(k.astype(window.dtype))
        # The key group re-quantized per channel over its tokens so far.
        filled = (jnp.arange(g) <= slot)[None, None, :, None]
        x = window.astype(jnp.float32)
        codes, scale, zero = _quantize(x, filled, 2, self.bits, self.k_scale.dtype)  # [B,H,g,D], [B,H,D]
        rows = codes.transpose(2, 0, 1, 3).reshape(g, b * h * d)
        group = jnp.minimum(pos, t - 1) // g
        words = jax.lax.dynamic_update_slice(self.k_words, _pack(rows, self.bits), (group * g * self.bits // 32, 0))
        k_scale = jax.lax.dynamic_update_slice(self.k_scale, scale.reshape(1, -1), (group, 0))
        k_zero = jax.lax.dynamic_update_slice(self.k_zero, zero.reshape(1, -1), (group, 0))
        # The value token quantized per group of channels.
        gv = self.value_group
        vx = v.astype(jnp.float32).reshape(b, h, d // gv, gv)
        vcodes, vscale, vzero = _quantize(vx, jnp.ones((1, 1, 1, gv), bool), 3, self.bits, self.v_scale.dtype)
        cols = jnp.arange(b * h) * t + jnp.minimum(pos, t - 1)
        vwords = self.v_words.at[:, cols].set(_pack(vcodes.reshape(b * h, d).T, self.bits))
        v_scale = self.v_scale.at[:, cols].set(vscale.reshape(b * h, -1).T)
        v_zero = self.v_zero.at[:, cols].set(vzero.reshape(b * h, -1).T)
        new = (words, k_scale, k_zero, vwords, v_scale, v_zero, window)
        old = (self.k_words, self.k_scale, self.k_zero, self.v_words, self.v_scale, self.v_zero, self.window)
        kept = [jnp.where(ok, a, o) for a, o in zip(new, old)]  # past the capacity: dropped
        return KVCache(*kept, pos + 1, self.bits, self.shape, self.key_group, self.value_group, self.dtype)


def _quantize(x: Any, valid: Any, axis: int, bits: int, scale_dtype: Any) -> tuple[Any, Any, Any]:
    """Asymmetric codes of ``x`` along ``axis`` over its ``valid`` elements: scale and zero-point
    rounded to ``scale_dtype`` first, so the codes are the nearest for the stored pair."""
    top = 2**bits - 1
    lo = jnp.min(jnp.where(valid, x, jnp.inf), axis=axis)
    hi = jnp.max(jnp.where(valid, x, -jnp.inf), axis=axis)
    scale = jnp.where(hi > lo, (hi - lo) / top, 1.0).astype(scale_dtype)
    zero = (-lo / scale.astype(jnp.float32)).astype(scale_dtype)
    s, z = (jnp.expand_dims(a.astype(jnp.float32), axis) for a in (scale, zero))
    codes = jnp.clip(jnp.round(x / s + z), 0, top).astype(jnp.uint32)
    return jnp.where(valid, codes, 0), scale, zero


def _pack(codes: Any, bits: int) -> Any:
    """u32 words of ``codes`` [K, N] packed along K (fusec's one-plane layout for 2, 4, 8 bits):
    word r holds codes r * 32/bits + j at bits j * bits; the fields are disjoint, so OR is a sum."""
    k, n = codes.shape
    per = 32 // bits
    lanes = (jnp.arange(per, dtype=jnp.uint32) * bits)[None, :, None]
    return jnp.sum(codes.reshape(k // per, per, n) << lanes, axis=1, dtype=jnp.uint32)
