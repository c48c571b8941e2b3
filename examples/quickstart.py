"""fusec quickstart: compile a GPT-2-style transformer block with fusec.jit into fused Pallas
kernels (Triton on an NVIDIA GPU, Pallas's interpreter on a CPU), print the program fusec made of
it, and check the result against jax.jit.

    python examples/quickstart.py
    fusec dump examples/quickstart.py:gpt2_block --stage all
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import fusec

D_MODEL, N_HEADS, SEQ = 64, 4, 16
EXAMPLE_FUNCTION = "gpt2_block"  # what `fusec dump/inspect/source/graph examples/quickstart.py:...` shows


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-5) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def attention(x: jax.Array, p: dict) -> jax.Array:
    seq, d = x.shape
    head = d // N_HEADS
    qkv = x @ p["w_qkv"] + p["b_qkv"]
    q, k, v = jnp.split(qkv, 3, axis=-1)
    q, k, v = (t.reshape(seq, N_HEADS, head).transpose(1, 0, 2) for t in (q, k, v))
    scores = jnp.einsum("hqd,hkd->hqk", q, k) / jnp.sqrt(head).astype(x.dtype)
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(x.dtype).min)
    out = jnp.einsum("hqk,hkd->hqd", jax.nn.softmax(scores, axis=-1), v)
    return out.transpose(1, 0, 2).reshape(seq, d) @ p["w_out"] + p["b_out"]


def gpt2_block(x: jax.Array, p: dict) -> jax.Array:
    x = x + attention(layer_norm(x, p["ln1_scale"], p["ln1_bias"]), p)
    h = jax.nn.gelu(layer_norm(x, p["ln2_scale"], p["ln2_bias"]) @ p["w_fc"] + p["b_fc"])
    return x + h @ p["w_proj"] + p["b_proj"]


def init_params(key: jax.Array, d: int = D_MODEL, dtype: jnp.dtype = jnp.float32) -> dict:
    k = jax.random.split(key, 4)
    normal = lambda kk, shape: (0.02 * jax.random.normal(kk, shape)).astype(dtype)  # noqa: E731
    return {
        "ln1_scale": jnp.ones(d, dtype), "ln1_bias": jnp.zeros(d, dtype),
        "w_qkv": normal(k[0], (d, 3 * d)), "b_qkv": jnp.zeros(3 * d, dtype),
        "w_out": normal(k[1], (d, d)), "b_out": jnp.zeros(d, dtype),
        "ln2_scale": jnp.ones(d, dtype), "ln2_bias": jnp.zeros(d, dtype),
        "w_fc": normal(k[2], (d, 4 * d)), "b_fc": jnp.zeros(4 * d, dtype),
        "w_proj": normal(k[3], (4 * d, d)), "b_proj": jnp.zeros(d, dtype),
    }


def example_inputs() -> tuple[jax.Array, dict]:
    """The arguments `fusec dump examples/quickstart.py:gpt2_block` uses."""
    key = jax.random.key(0)
    return jax.random.normal(key, (SEQ, D_MODEL)), init_params(jax.random.fold_in(key, 1))


def main() -> None:
    x, params = example_inputs()
    block = fusec.jit(gpt2_block, backend="pallas")
    lowered = block.lower(x, params)
    print(f"# fusec pipeline: {', '.join(lowered.stages)}")
    module = lowered.program.module
    print(lowered.as_text().split("\n\n")[0])  # the entry function: one kernel op per fused group
    ops_before = len(lowered.program.module_before("fuse").entry.ops)
    print(f"\n# {ops_before} ops became {len(lowered.program.kernels)} kernels:")
    for op in module.entry.ops:
        if op.opcode == "kernel":
            body = module.function(str(op.attr("callee")))
            print(f"#   {op.attr('callee'):16s} {op.attr('kind'):11s} {len(body.ops):3d} ops  "
                  f"grid {list(op.attr('grid'))}  {op.attr('bytes_read') + op.attr('bytes_written'):7d} bytes")
    out, ref = block(x, params), jax.jit(gpt2_block)(x, params)
    err = float(np.max(np.abs(np.asarray(out) - np.asarray(ref))))
    print(f"# fallbacks to XLA: {len(lowered.fallbacks)}; max |fusec.jit - jax.jit| = {err:.3g}")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)
    print("# fusec.jit matches jax.jit")


if __name__ == "__main__":
    main()
