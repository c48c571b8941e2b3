"""A pre-norm transformer block written with Haiku, compiled by fusec.jit unchanged: the function
fusec compiles is ``hk.transform(...).apply``.

    python examples/haiku_block.py
    fusec source examples/haiku_block.py:forward
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
from _common import run_and_compare

D_MODEL, N_HEADS, SEQ = 64, 4, 16
EXAMPLE_FUNCTION = "forward"


def block(x: jax.Array) -> jax.Array:
    h = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True)(x)
    mask = jnp.tril(jnp.ones((x.shape[0], x.shape[0]), bool))[None]
    attn = hk.MultiHeadAttention(N_HEADS, D_MODEL // N_HEADS, w_init=hk.initializers.VarianceScaling(1.0))
    x = x + attn(h, h, h, mask=mask)
    h = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True)(x)
    return x + hk.Linear(D_MODEL)(jax.nn.gelu(hk.Linear(4 * D_MODEL)(h)))


MODEL = hk.without_apply_rng(hk.transform(block))


def forward(params: hk.Params, x: jax.Array) -> jax.Array:
    return MODEL.apply(params, x)


def example_inputs() -> tuple[hk.Params, jax.Array]:
    x = jax.random.normal(jax.random.key(1), (SEQ, D_MODEL))
    return MODEL.init(jax.random.key(0), x), x


def main() -> None:
    params, x = example_inputs()
    run_and_compare(forward, params, x, label="haiku block forward")
    grad = jax.grad(lambda p: jnp.mean(forward(p, x) ** 2))
    run_and_compare(grad, params, rtol=1e-4, atol=1e-6, label="haiku block gradient")


if __name__ == "__main__":
    main()
