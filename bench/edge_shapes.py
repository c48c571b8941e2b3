"""Kernels at shapes that divide no block, each checked against ``jax.jit``: the program
``compute-sanitizer`` watches in the one-command GPU run (``bench.gpu_all``), where an unmasked
access past an array's end is reported as an error instead of passing silently.

    python -m bench.edge_shapes [--backend pallas] [--dry]

Exits 1 if any result differs from ``jax.jit`` beyond the suite's tolerances.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _layernorm(x: Any, g: Any) -> Any:
    mu = x.mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * g


def _rmsnorm(x: Any, g: Any) -> Any:
    return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * g


Case = tuple[str, Callable[..., Any], Callable[..., Any], tuple[Any, ...]]


def cases(dry: bool) -> list[Case]:
    """(name, function, its jax.jit reference, arguments): norms at widths 768/1000, softmax at 1000, low-bit GEMVs with
    M < 16 and N dividing no block, a matmul whose every dimension overhangs."""
    from fusec import lowprec

    rng = np.random.default_rng(0)
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    k, n = (256, 200) if dry else (4096, 1000)
    w = arr(k, n) * 0.05
    out: list[Case] = []
    for width in (768, 1000):
        out.append((f"layernorm 5x{width}", _layernorm, _layernorm, (arr(5, width), arr(width))))
        out.append((f"rmsnorm 5x{width}", _rmsnorm, _rmsnorm, (arr(5, width), arr(width))))
    softmax = lambda x: jax.nn.softmax(x, axis=-1)  # noqa: E731
    out.append(("softmax 7x1000", softmax, softmax, (arr(7, 1000),)))
    matmul = lambda x, q: x @ q  # noqa: E731
    # The reference multiplies by the dequantized weight (what the kernel must reproduce exactly).
    dequantized = lambda x, q: x @ q.dequantize().astype(x.dtype)  # noqa: E731
    for bits, group in ((4, 128), (3, 128), (2, 64)):
        qw = lowprec.quantize({"w": w}, lowprec.QuantSpec(bits, group))["w"]
        for m in (1, 3, 17):
            out.append((f"int{bits} g{group} M={m} K={k} N={n}", matmul, dequantized, (arr(m, k), qw)))
    dense = lambda a, b: jnp.tanh(a @ b)  # noqa: E731
    out.append(("matmul 33x70 @ 70x45", dense, dense, (arr(33, 70), arr(70, 45))))
    return out


def run(backend: str, dry: bool) -> list[dict[str, Any]]:
    """Runs every case on ``backend`` (GPU kernels, or the interpreter with ``dry``) and compares."""
    import fusec

    rows = []
    for name, fn, reference, args in cases(dry):
        want = jax.jit(reference)(*args)
        try:
            got = fusec.jit(fn, backend=backend, interpret=dry)(*args)
            err = float(jnp.max(jnp.abs(got - want)) / jnp.maximum(jnp.max(jnp.abs(want)), 1e-30))
            rows.append({"case": name, "rel err": err, "ok": err <= 2e-2})
        except Exception as e:  # a case that fails to build or run is a failed row, not a stop
            rows.append({"case": name, "rel err": None, "ok": False, "error": f"{type(e).__name__}: {e}"[:300]})
        print(f"{rows[-1]['case']}: {'ok' if rows[-1]['ok'] else 'FAILED'} rel err {rows[-1]['rel err']}",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.edge_shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="pallas")
    parser.add_argument("--dry", action="store_true", help="small shapes, kernels in the interpreter (a CPU)")
    ns = parser.parse_args(argv)
    rows = run(ns.backend, ns.dry)
    print(f"{sum(r['ok'] for r in rows)}/{len(rows)} edge-shaped cases match jax.jit on backend {ns.backend}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
