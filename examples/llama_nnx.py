"""A Llama-style decoder block (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU) written
with Flax NNX, compiled by fusec.jit unchanged: the forward pass, and one training step with
jax.grad and optax.

    python examples/llama_nnx.py
    fusec inspect examples/llama_nnx.py:forward
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from _common import run_and_compare
from flax import nnx

D_MODEL, N_HEADS, N_KV_HEADS, D_FF, SEQ = 64, 4, 2, 128, 16
HEAD = D_MODEL // N_HEADS
EXAMPLE_FUNCTION = "forward"


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        self.scale = nnx.Param(jnp.ones(dim))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * self.scale[...]


def rotary(x: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding over [seq, heads, head_dim], rotating halves."""
    seq, _, dim = x.shape
    freqs = base ** (-jnp.arange(0, dim // 2, dtype=jnp.float32) * 2.0 / dim)
    angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * freqs[None, :]
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
    x1, x2 = x[..., : dim // 2], x[..., dim // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.wq = nnx.Linear(D_MODEL, N_HEADS * HEAD, use_bias=False, rngs=rngs)
        self.wk = nnx.Linear(D_MODEL, N_KV_HEADS * HEAD, use_bias=False, rngs=rngs)
        self.wv = nnx.Linear(D_MODEL, N_KV_HEADS * HEAD, use_bias=False, rngs=rngs)
        self.wo = nnx.Linear(N_HEADS * HEAD, D_MODEL, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        seq = x.shape[0]
        q = rotary(self.wq(x).reshape(seq, N_HEADS, HEAD))
        k = rotary(self.wk(x).reshape(seq, N_KV_HEADS, HEAD))
        v = self.wv(x).reshape(seq, N_KV_HEADS, HEAD)
        # Grouped-query attention: each key/value head serves N_HEADS // N_KV_HEADS query heads.
        k, v = (jnp.repeat(t, N_HEADS // N_KV_HEADS, axis=1) for t in (k, v))
        scores = jnp.einsum("qhd,khd->hqk", q, k) / jnp.sqrt(HEAD).astype(x.dtype)
        causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
        probs = jax.nn.softmax(jnp.where(causal, scores, jnp.finfo(x.dtype).min), axis=-1)
        return self.wo(jnp.einsum("hqk,khd->qhd", probs, v).reshape(seq, N_HEADS * HEAD))


class SwiGLU(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.gate = nnx.Linear(D_MODEL, D_FF, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(D_MODEL, D_FF, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(D_FF, D_MODEL, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.attn_norm, self.mlp_norm = RMSNorm(D_MODEL), RMSNorm(D_MODEL)
        self.attn, self.mlp = Attention(rngs), SwiGLU(rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


# NNX modules are Python objects; split them into a static graph and a pytree of arrays to jit.
GRAPHDEF, _ = nnx.split(LlamaBlock(nnx.Rngs(0)))
OPTIMIZER = optax.adamw(1e-3)


def forward(state: nnx.State, x: jax.Array) -> jax.Array:
    return nnx.merge(GRAPHDEF, state)(x)


def train_step(state: nnx.State, opt_state: optax.OptState, x: jax.Array, target: jax.Array) -> tuple:
    loss, grads = jax.value_and_grad(lambda s: jnp.mean((forward(s, x) - target) ** 2))(state)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, state)
    return optax.apply_updates(state, updates), opt_state, loss


def example_inputs() -> tuple[nnx.State, jax.Array]:
    _, state = nnx.split(LlamaBlock(nnx.Rngs(0)))
    return state, jax.random.normal(jax.random.key(1), (SEQ, D_MODEL))


def main() -> None:
    state, x = example_inputs()
    run_and_compare(forward, state, x, label="llama block forward")
    target = jax.random.normal(jax.random.key(2), x.shape)
    run_and_compare(train_step, state, OPTIMIZER.init(state), x, target, rtol=1e-4, atol=1e-5,
                    label="llama block train step")


if __name__ == "__main__":
    main()
