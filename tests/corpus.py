"""Functions that fusec.jit must run exactly like jax.jit: models' building blocks, einsum-heavy
code, and control flow or scatter that must fall back to XLA. Each case makes its own inputs for a
float dtype, so the same corpus runs in float32 and bfloat16 (and, in later stages, on other backends).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclass(frozen=True)
class Case:
    name: str
    fn: Callable[..., Any]
    make_args: Callable[[Any, np.random.Generator], tuple[Any, ...]]
    falls_back: bool = False  # True: some primitive must run through XLA as an opaque op
    differentiable: bool = True  # jax.grad of the sum of float outputs makes sense
    static_argnums: tuple[int, ...] = field(default=())


def _n(rng: np.random.Generator, dtype: Any, *shape: int, scale: float = 1.0) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype=dtype)


def _layernorm(x, g, b, eps=1e-5):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) * lax.rsqrt(v + eps) * g + b


def _rmsnorm(x, g, eps=1e-6):
    xf = x.astype(jnp.float32)
    return (xf * lax.rsqrt((xf * xf).mean(-1, keepdims=True) + eps)).astype(x.dtype) * g


def _attention(q, k, v, causal=True):
    s = q @ k.swapaxes(-1, -2) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
    if causal:
        n = s.shape[-1]
        s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, -1e9)
    return jax.nn.softmax(s, axis=-1) @ v


def _mlp(x, w1, b1, w2, b2):
    return jax.nn.relu(x @ w1 + b1) @ w2 + b2


def _swiglu(x, wg, wu, wd):
    return (jax.nn.silu(x @ wg) * (x @ wu)) @ wd


def _rotary(x, pos):
    d = x.shape[-1] // 2
    freqs = 1.0 / (10000 ** (jnp.arange(d, dtype=jnp.float32) / d))
    ang = pos[:, None].astype(jnp.float32) * freqs[None, :]
    cos, sin = jnp.cos(ang).astype(x.dtype), jnp.sin(ang).astype(x.dtype)
    x1, x2 = x[..., :d], x[..., d:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def _cross_entropy(logits, labels):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.sum(jax.nn.one_hot(labels, logits.shape[-1]) * logp, axis=-1))


def _while_norm(x):
    def cond(c):
        return c[1] < 5

    def body(c):
        return (c[0] * 0.9 + 0.1, c[1] + 1)

    return lax.while_loop(cond, body, (x, 0))[0]


def _scan_rnn(h0, xs, w):
    def step(h, x):
        h = jnp.tanh(h @ w + x)
        return h, h.sum()
    return lax.scan(step, h0, xs)


def _cond(x, flag):
    return lax.cond(flag > 0, lambda y: jnp.sin(y) * 2, lambda y: jnp.cos(y) - 1, x)


@jax.custom_jvp
def _softclip(x):
    return jnp.tanh(x) * 3


_softclip.defjvp(lambda p, t: (_softclip(p[0]), t[0] * 3 * (1 - jnp.tanh(p[0]) ** 2)))

_CONST_TABLE = np.linspace(-1, 1, 24, dtype=np.float32).reshape(3, 8)


def _int_ops(x, y):
    return (x * y + (x >> 1) - (y & 7)) % 11, jnp.maximum(x, y), x < y, ~x, x ^ y


CORPUS: list[Case] = [
    Case("add", lambda x, y: x + y, lambda dt, r: (_n(r, dt, 8, 16), _n(r, dt, 8, 16))),
    Case("elementwise_chain", lambda x: jnp.exp(-x * x) * jnp.sin(x) + jnp.log1p(jnp.abs(x)) / (1 + x**2),
         lambda dt, r: (_n(r, dt, 33, 17),)),
    Case("broadcast_ops", lambda x, b, s: x * b[None, :] - s, lambda dt, r: (_n(r, dt, 5, 7), _n(r, dt, 7), 2.5)),
    Case("mlp", _mlp, lambda dt, r: (_n(r, dt, 8, 32), _n(r, dt, 32, 64, scale=0.2), _n(r, dt, 64),
                                      _n(r, dt, 64, 16, scale=0.2), _n(r, dt, 16))),
    Case("layernorm", _layernorm, lambda dt, r: (_n(r, dt, 16, 64), _n(r, dt, 64), _n(r, dt, 64))),
    Case("rmsnorm", _rmsnorm, lambda dt, r: (_n(r, dt, 16, 64), _n(r, dt, 64))),
    Case("softmax", lambda x: jax.nn.softmax(x, axis=-1), lambda dt, r: (_n(r, dt, 12, 40),)),
    Case("log_softmax", lambda x: jax.nn.log_softmax(x, axis=0), lambda dt, r: (_n(r, dt, 12, 40),)),
    Case("gelu_tanh", lambda x: jax.nn.gelu(x, approximate=True), lambda dt, r: (_n(r, dt, 64, 3),)),
    Case("gelu_exact", lambda x: jax.nn.gelu(x, approximate=False), lambda dt, r: (_n(r, dt, 64, 3),)),
    Case("silu", jax.nn.silu, lambda dt, r: (_n(r, dt, 10, 10),)),
    Case("swiglu", _swiglu, lambda dt, r: (_n(r, dt, 4, 32), _n(r, dt, 32, 48, scale=0.2),
                                            _n(r, dt, 32, 48, scale=0.2), _n(r, dt, 48, 32, scale=0.2))),
    Case("attention_causal", _attention, lambda dt, r: (_n(r, dt, 2, 8, 16), _n(r, dt, 2, 8, 16),
                                                         _n(r, dt, 2, 8, 16))),
    Case("attention_multihead_einsum",
         lambda x, wq, wk, wv: jnp.einsum(
             "bhqk,bkhd->bqhd",
             jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", jnp.einsum("bsd,dhe->bshe", x, wq),
                                       jnp.einsum("bsd,dhe->bshe", x, wk)) / 4.0, axis=-1),
             jnp.einsum("bsd,dhe->bshe", x, wv)),
         lambda dt, r: (_n(r, dt, 2, 6, 16), _n(r, dt, 16, 2, 8, scale=0.3), _n(r, dt, 16, 2, 8, scale=0.3),
                        _n(r, dt, 16, 2, 8, scale=0.3))),
    Case("einsum_batched_matmul", lambda a, b: jnp.einsum("bij,bjk->bik", a, b),
         lambda dt, r: (_n(r, dt, 3, 4, 5), _n(r, dt, 3, 5, 6))),
    Case("einsum_transposed_operands", lambda a, b: jnp.einsum("ji,kj->ik", a, b),
         lambda dt, r: (_n(r, dt, 5, 4), _n(r, dt, 6, 5))),
    Case("einsum_multi_contract", lambda a, b: jnp.einsum("abcd,cdbe->ae", a, b),
         lambda dt, r: (_n(r, dt, 2, 3, 4, 5), _n(r, dt, 4, 5, 3, 6))),
    Case("einsum_outer", lambda a, b: jnp.einsum("i,j->ij", a, b), lambda dt, r: (_n(r, dt, 7), _n(r, dt, 9))),
    Case("einsum_batch_last", lambda a, b: jnp.einsum("ikb,kjb->bij", a, b),
         lambda dt, r: (_n(r, dt, 3, 4, 2), _n(r, dt, 4, 5, 2))),
    Case("matvec_and_dot", lambda m, v: (m @ v, v @ v, jnp.vdot(v, v)), lambda dt, r: (_n(r, dt, 6, 9), _n(r, dt, 9))),
    Case("tensordot", lambda a, b: jnp.tensordot(a, b, axes=([1, 2], [0, 1])),
         lambda dt, r: (_n(r, dt, 3, 4, 5), _n(r, dt, 4, 5, 2))),
    Case("reductions", lambda x: (x.sum(0), x.max(1), x.min(), jnp.prod(x[:2], -1), x.mean(), x.var(0)),
         lambda dt, r: (_n(r, dt, 6, 5),)),
    Case("argmax_argmin", lambda x: (jnp.argmax(x, -1), jnp.argmin(x, 0)), lambda dt, r: (_n(r, dt, 6, 5),),
         differentiable=False),
    Case("where_clip", lambda x: jnp.where(x > 0, jnp.clip(x, 0.1, 1.5), x * 0.01), lambda dt, r: (_n(r, dt, 9, 9),)),
    Case("reshape_transpose", lambda x: x.reshape(4, 3, 10).transpose(2, 0, 1).reshape(10, 12).T,
         lambda dt, r: (_n(r, dt, 12, 10),)),
    Case("squeeze_expand", lambda x: jnp.expand_dims(jnp.squeeze(x, 1), 0) * 2, lambda dt, r: (_n(r, dt, 5, 1, 4),)),
    Case("iota_arange", lambda x: x * jnp.arange(x.shape[-1], dtype=x.dtype) + jnp.eye(x.shape[-1], dtype=x.dtype),
         lambda dt, r: (_n(r, dt, 6, 6),)),
    Case("convert_dtypes", lambda x: (x.astype(jnp.float32) * 2).astype(jnp.int32) + (x > 0).astype(jnp.int32),
         lambda dt, r: (_n(r, dt, 8, 3, scale=5),), differentiable=False),
    Case("comparisons_logic", lambda x, y: ((x > y) & (x < 2 * y)) | ~(x == y),
         lambda dt, r: (_n(r, dt, 7, 7), _n(r, dt, 7, 7)), differentiable=False),
    Case("integer_ops", _int_ops, lambda dt, r: (jnp.asarray(r.integers(1, 100, (5, 6)), jnp.int32),
                                                   jnp.asarray(r.integers(1, 100, (5, 6)), jnp.int32)),
         differentiable=False),
    Case("rotary_embedding", _rotary, lambda dt, r: (_n(r, dt, 8, 16), jnp.arange(8))),
    Case("cross_entropy", _cross_entropy, lambda dt, r: (_n(r, dt, 6, 10), jnp.asarray(r.integers(0, 10, 6)))),
    Case("pytree_in_out", lambda p, x: {"y": x @ p["w"] + p["b"], "aux": [x.sum(), (x * 2,)]},
         lambda dt, r: ({"w": _n(r, dt, 4, 3), "b": _n(r, dt, 3)}, _n(r, dt, 2, 4))),
    Case("closure_constants",
         lambda x: x @ jnp.asarray(_CONST_TABLE.T, x.dtype) + jnp.asarray([1.0, 2.0, 3.0], x.dtype),
         lambda dt, r: (_n(r, dt, 5, 8),)),
    Case("nested_jit", lambda x: jax.jit(lambda y: jax.jit(jnp.tanh)(y) * 2)(x) + jax.jit(jnp.tanh)(x),
         lambda dt, r: (_n(r, dt, 4, 4),)),
    Case("custom_jvp_relu_softplus", lambda x: jax.nn.relu(x) + jax.nn.softplus(x) + _softclip(x),
         lambda dt, r: (_n(r, dt, 16, 8),)),
    Case("custom_vjp_checkpoint", lambda x: jax.checkpoint(lambda y: jnp.sin(y) @ jnp.cos(y).T)(x),
         lambda dt, r: (_n(r, dt, 4, 4),)),
    Case("math_functions", lambda x: (jnp.tanh(x) + jax.nn.sigmoid(x) + jnp.arctan(x) + jnp.sqrt(jnp.abs(x) + 1)
                                      + jnp.floor(x) + jnp.ceil(x) + jnp.round(x) + jnp.sign(x) + lax.erf(x)
                                      + jnp.exp2(x) + jnp.cbrt(x) + jnp.power(jnp.abs(x) + 1, 1.5)),
         lambda dt, r: (_n(r, dt, 5, 9),)),
    Case("slicing_concat", lambda x: jnp.concatenate([x[:, :3], x[:, 5:], x[::2, 1:4:2].repeat(2, 0)[:x.shape[0]]], 1),
         lambda dt, r: (_n(r, dt, 6, 8),)),
    # Control flow and scatter: run through XLA as opaque ops, still correct.
    Case("cond_fallback", _cond, lambda dt, r: (_n(r, dt, 4, 4), jnp.int32(1)), falls_back=True),
    Case("while_fallback", _while_norm, lambda dt, r: (_n(r, dt, 4, 4),), falls_back=True, differentiable=False),
    Case("fori_loop_fallback", lambda x: lax.fori_loop(0, 3, lambda i, c: c * 1.5 + i, x),
         lambda dt, r: (_n(r, dt, 4, 4),), falls_back=True),
    Case("scan_fallback", _scan_rnn, lambda dt, r: (_n(r, dt, 4), _n(r, dt, 5, 4), _n(r, dt, 4, 4, scale=0.3)),
         falls_back=True),
    Case("scatter_fallback", lambda x, i: x.at[i].add(1.0).at[0].set(-3.0),
         lambda dt, r: (_n(r, dt, 6, 3), jnp.asarray([1, 3, 3])), falls_back=True),
    Case("gather_cumsum_sort", lambda x, i: (x[i], jnp.cumsum(x, 0), jnp.sort(x, axis=-1)),
         lambda dt, r: (_n(r, dt, 6, 3), jnp.asarray([4, 0, 2])), falls_back=True),
    Case("random_inside", lambda x: x + jax.random.normal(jax.random.key(3), x.shape, x.dtype),
         lambda dt, r: (_n(r, dt, 4, 5),), falls_back=True),
    Case("pad_edges", lambda x: (jnp.pad(x, ((1, 2), (0, 3))), lax.pad(x, jnp.asarray(0.5, x.dtype),
                                                                       ((-1, 2, 0), (2, -3, 0)))),
         lambda dt, r: (_n(r, dt, 5, 6),)),
    Case("pow_int_exponent", lambda x, n: (jnp.abs(x) + 0.5) ** n,
         lambda dt, r: (_n(r, dt, 4, 3), jnp.asarray([1, 2, 3], jnp.int32)), differentiable=False),
    Case("grad_inside", lambda x, w: jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w) * (x @ w)))(w),
         lambda dt, r: (_n(r, dt, 8, 16), _n(r, dt, 16, 8, scale=0.3))),
    Case("static_arg_power", lambda x, n: sum(x**k for k in range(n)), lambda dt, r: (_n(r, dt, 3, 3), 3),
         static_argnums=(1,)),
]
