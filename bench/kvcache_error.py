"""The error of fusec.lowprec.KVCache (int8, int4, int2) against a float cache: on random N(0, 1)
keys and values, and on real activations (all-MiniLM-L6-v2's queries, keys and values at one
layer, for a few hundred tokens of English text). Per case: max and mean absolute error of the
dequantized keys and values, and of the attention output (every query over the cache), and the
output's cosine to the float cache's.

    python -m bench.kvcache_error [--layer 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusec.lowprec import KVCache

TEXT = Path(__file__).resolve().parents[1] / "README.md"


def errors(got: Any, want: Any) -> dict[str, float]:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want)
    cos = float((got * want).sum() / max(np.linalg.norm(got) * np.linalg.norm(want), 1e-30))
    return {"max": float(err.max()), "mean": float(err.mean()), "cos": cos}


def attend(q: Any, k: Any, v: Any, n: int) -> Any:
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k[:, :, :n]) / np.sqrt(q.shape[-1])
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v[:, :, :n])


def rows_for(name: str, q: Any, k: Any, v: Any) -> list[dict[str, Any]]:
    """``q``, ``k``, ``v``: [B, H, T, D] float32."""
    b, h, t, d = k.shape
    want = attend(q, k, v, t)
    rows = []
    for bits in (8, 4, 2):
        cache = KVCache.create(b, h, -(-t // 64) * 64, d, bits, dtype=jnp.float32)
        cache = jax.jit(lambda c, k, v: c.append(k, v))(cache, k, v)
        got = attend(q, cache.keys(), cache.values(), t)
        rows.append({"data": name, "bits": bits, "keys": errors(cache.keys()[:, :, :t], k),
                     "values": errors(cache.values()[:, :, :t], v), "output": errors(got, want)})
    return rows


def minilm_qkv(layer: int) -> tuple[Any, Any, Any]:
    """MiniLM's Q, K, V [1, 12, T, 32] at ``layer`` for the README's first few hundred tokens."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import minilm

    params = minilm.load_params()
    ids, mask = minilm.tokenize([TEXT.read_text()])
    e = params["embed"]
    s = ids.shape[1]
    x = minilm._layer_norm(e["word"][ids] + e["position"][:s][None] + e["token_type"][0][None, None],
                           params["embed_ln"])
    bias = jnp.zeros((1, 1, 1, s))
    for p in params["layers"][:layer]:
        x = minilm._layer(x, bias, p, heads=12)
    p = params["layers"][layer]
    split = lambda t: t.reshape(1, s, 12, -1).transpose(0, 2, 1, 3)  # noqa: E731
    return tuple(split(minilm._dense(x, p[n])) for n in ("q", "k", "v"))  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kvcache_error", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", type=int, default=3)
    ns = parser.parse_args(argv)
    keys = jax.random.split(jax.random.key(0), 3)
    rows = rows_for("random N(0,1), 1x4 heads, 1000 tokens, d=64",
                    *(jax.random.normal(kk, (1, 4, n, 64)) for kk, n in zip(keys, (16, 1000, 1000))))
    try:
        q, k, v = minilm_qkv(ns.layer)
        rows += rows_for(f"MiniLM layer {ns.layer}, 12 heads, {k.shape[2]} tokens, d=32", q, k, v)
    except ImportError as e:
        print(f"MiniLM skipped: {e}", file=sys.stderr)
    print("| data | bits | keys max / mean | values max / mean | output max / mean | output cosine |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        k, v, o = r["keys"], r["values"], r["output"]
        print(f"| {r['data']} | {r['bits']} | {k['max']:.3g} / {k['mean']:.3g} | {v['max']:.3g} / {v['mean']:.3g} "
              f"| {o['max']:.3g} / {o['mean']:.3g} | {o['cos']:.5f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
