"""A pre-norm transformer block (multi-head attention + GELU MLP) written with Flax Linen, compiled
by fusec.jit unchanged: ``model.apply`` is the function fusec compiles.

    python examples/linen_block.py
    fusec graph examples/linen_block.py:forward -o linen_block.html
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from _common import run_and_compare

D_MODEL, N_HEADS, SEQ = 64, 4, 16
EXAMPLE_FUNCTION = "forward"


class Block(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=N_HEADS)(h, mask=nn.make_causal_mask(h[..., 0]))
        h = nn.Dense(4 * D_MODEL)(nn.LayerNorm()(x))
        return x + nn.Dense(D_MODEL)(nn.gelu(h))


MODEL = Block()


def forward(params: dict, x: jax.Array) -> jax.Array:
    return MODEL.apply(params, x)


def example_inputs() -> tuple[dict, jax.Array]:
    x = jax.random.normal(jax.random.key(1), (2, SEQ, D_MODEL))  # [batch, seq, features]
    return MODEL.init(jax.random.key(0), x), x


def main() -> None:
    params, x = example_inputs()
    run_and_compare(forward, params, x, label="linen block forward")
    grad = jax.grad(lambda p: jnp.mean(forward(p, x) ** 2))
    run_and_compare(grad, params, rtol=1e-4, atol=1e-6, label="linen block gradient")


if __name__ == "__main__":
    main()
