"""A pre-norm transformer block written with Equinox, compiled by fusec.jit unchanged: the forward
pass, and one training step with optax. Equinox modules hold functions and ints next to their
arrays, so, as with ``jax.jit``, the arrays are split off with ``eqx.partition`` and the rest is
closed over.

    python examples/equinox_block.py
    fusec inspect examples/equinox_block.py:forward
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from _common import run_and_compare

D_MODEL, N_HEADS, SEQ = 64, 4, 16
EXAMPLE_FUNCTION = "forward"


class Block(eqx.Module):
    ln1: eqx.nn.LayerNorm
    ln2: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    fc: eqx.nn.Linear
    proj: eqx.nn.Linear

    def __init__(self, key: jax.Array) -> None:
        k1, k2, k3 = jax.random.split(key, 3)
        self.ln1, self.ln2 = eqx.nn.LayerNorm(D_MODEL), eqx.nn.LayerNorm(D_MODEL)
        self.attn = eqx.nn.MultiheadAttention(N_HEADS, D_MODEL, key=k1)
        self.fc = eqx.nn.Linear(D_MODEL, 4 * D_MODEL, key=k2)
        self.proj = eqx.nn.Linear(4 * D_MODEL, D_MODEL, key=k3)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.vmap(self.ln1)(x)
        x = x + self.attn(h, h, h, mask=jnp.tril(jnp.ones((x.shape[0], x.shape[0]), bool)))
        h = jax.vmap(self.fc)(jax.vmap(self.ln2)(x))
        return x + jax.vmap(self.proj)(jax.nn.gelu(h))


PARAMS, STATIC = eqx.partition(Block(jax.random.key(0)), eqx.is_array)
OPTIMIZER = optax.sgd(1e-2)


def forward(params: Block, x: jax.Array) -> jax.Array:
    return eqx.combine(params, STATIC)(x)


def train_step(params: Block, opt_state: optax.OptState, x: jax.Array, target: jax.Array) -> tuple:
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((forward(p, x) - target) ** 2))(params)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
    return eqx.apply_updates(params, updates), opt_state, loss


def example_inputs() -> tuple[Block, jax.Array]:
    return PARAMS, jax.random.normal(jax.random.key(1), (SEQ, D_MODEL))


def main() -> None:
    params, x = example_inputs()
    run_and_compare(forward, params, x, label="equinox block forward")
    target = jax.random.normal(jax.random.key(2), x.shape)
    run_and_compare(train_step, params, OPTIMIZER.init(params), x, target, rtol=1e-4, atol=1e-6,
                    label="equinox block train step")


if __name__ == "__main__":
    main()
