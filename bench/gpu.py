"""The GPU suite: one run, one table, against the baseline a user would otherwise pick and against
the hardware's limit. Sized to finish within 5 minutes on one H100.

    python -m bench.gpu [--json out.json]    on a GPU
    python -m bench.gpu --dry                tiny shapes, Pallas interpret mode: checks the script on a CPU

Rows: low-bit GEMV/GEMM (int2..int8, nf4, fp4 weights, unpacked inside fusec's matmul) vs a
bfloat16 ``jnp.dot`` under ``jax.jit``, with achieved bandwidth as a fraction of the GPU's peak;
GPT-2 and Llama blocks (decode 1x1, prefill 8x512) under ``fusec.jit`` vs ``jax.jit``; attention
(prefill 2048 causal, decode 1 x 4096) vs ``jax.nn.dot_product_attention`` (XLA, cuDNN); layernorm,
rmsnorm and softmax on 8192x8192 bfloat16 vs ``jax.jit`` and the Pallas GPU ops that ship with JAX;
fusec's compile time on the GPU. Times are medians of many repetitions after warm-up, each call
blocked until ready.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp

from bench import models
from bench.timing import first_call_seconds, median_seconds, table, write_json

COLUMNS = ["group", "row", "shape", "fusec ms", "baseline", "baseline ms", "speedup", "GB/s", "% peak BW", "rel err"]
FORMATS = {"int2": (2, 128, "int"), "int3": (3, 128, "int"), "int4": (4, 128, "int"), "int5": (5, 128, "int"),
           "int6": (6, 128, "int"), "int8": (8, 128, "int"), "nf4": (4, 64, "nf"), "fp4": (4, 32, "fp")}


@dataclass(frozen=True)
class Sizes:
    weights: tuple[tuple[int, int], ...]
    ms: tuple[int, ...]
    gpt2: tuple[int, int]  # d, heads
    llama: tuple[int, int, int, int]  # d, heads, kv heads, ff
    batch_seq: tuple[tuple[int, int], ...]
    norm: tuple[int, int]
    reps: int
    attention: tuple[tuple[int, int, int, int, int], ...] = ()  # batch, heads, Tq, Tk, head dim


FULL = Sizes(((4096, 4096), (4096, 14336)), (1, 4, 16, 64), (768, 12), (2048, 16, 4, 5632),
             ((1, 1), (8, 512)), (8192, 8192), 50, ((4, 16, 2048, 2048, 64), (1, 32, 1, 4096, 128)))
DRY = Sizes(((128, 128), (128, 256)), (1, 16), (64, 4), (64, 4, 2, 128), ((1, 1), (2, 16)), (64, 256), 2,
            ((1, 2, 40, 40, 32), (1, 2, 1, 64, 32)))


def peak_bandwidth(device_kind: str) -> float | None:
    """Bytes per second for a known GPU (fusec.roofline's datasheet table), else None."""
    from fusec.roofline import GPUS

    kind = device_kind.lower().replace(" ", "")
    for key in ("h200", "h100", "a100", "l4", "rtx4090"):
        if key.replace("rtx", "") in kind:
            return GPUS[key].memory_bandwidth
    return None


def _row(group: str, row: str, shape: str, fusec_s: float, baseline: str, baseline_s: float | None,
         nbytes: int | None = None, peak: float | None = None) -> dict[str, Any]:
    """One table row; also printed to stderr as it is measured, so a run cut short keeps its rows."""
    out: dict[str, Any] = {"group": group, "row": row, "shape": shape, "fusec ms": fusec_s * 1e3,
                           "baseline": baseline, "baseline ms": None if baseline_s is None else baseline_s * 1e3,
                           "speedup": None if baseline_s is None else baseline_s / fusec_s}
    if nbytes is not None:
        out["GB/s"] = nbytes / fusec_s / 1e9
        out["% peak BW"] = None if peak is None else 100 * nbytes / fusec_s / peak
    print("  ".join(f"{c}={out[c]:.4g}" if isinstance(out.get(c), float) else f"{c}={out.get(c)}" for c in COLUMNS
                    if c in out), file=sys.stderr, flush=True)
    return out


def _columns(q: Any, n: int) -> Any:
    """The first ``n`` columns of a QuantizedArray (planes, scales and zero-points are [.., N])."""
    if q.shape[1] == n:
        return q
    cut = lambda a: None if a is None else a[:, :n]  # noqa: E731
    return replace(q, planes=tuple(cut(p) for p in q.planes), scales=cut(q.scales), zeros=cut(q.zeros),
                   shape=(q.shape[0], n))


def lowbit_rows(sizes: Sizes, interpret: bool, peak: float | None, backend: str = "pallas") -> list[dict[str, Any]]:
    import fusec
    from fusec import lowprec

    rows = []
    key = jax.random.key(0)
    k = sizes.weights[0][0]
    widest = max(n for _, n in sizes.weights)
    w_wide = (jax.random.normal(key, (k, widest), jnp.float32) * 0.02).astype(jnp.bfloat16)
    # Quantized once, from the bf16 weight (so fusec's kernel also produces bf16, as the baseline
    # does); narrower weights are column slices, which is exact: groups run down the columns.
    wide = {name: lowprec.quantize({"w": w_wide}, lowprec.QuantSpec(bits, group, fmt))["w"]
            for name, (bits, group, fmt) in FORMATS.items()}
    matmul = fusec.jit(lambda q, x: x @ q, backend=backend, interpret=interpret)
    dot = jax.jit(jnp.dot)
    reference = jax.jit(lambda q, x: jnp.dot(x.astype(jnp.float32), q.dequantize().astype(jnp.float32)))
    for _, n in sizes.weights:
        w_bf16 = w_wide[:, :n]
        quantized = {name: _columns(q, n) for name, q in wide.items()}
        for m in sizes.ms:
            x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
            base = median_seconds(dot, x, w_bf16, reps=sizes.reps)
            for name, q in quantized.items():
                t = median_seconds(matmul, q, x, reps=sizes.reps)
                nbytes = q.nbytes + x.nbytes + m * n * 2
                row = _row("low-bit matmul", name, f"M={m} K={k} N={n}", t, "bf16 jnp.dot", base, nbytes, peak)
                # A timing is only worth having for a right answer: fusec's result against XLA's
                # float32 product with the same dequantized weight (bf16 output: ~1e-2 relative).
                want = reference(q, x)
                row["rel err"] = float(jnp.max(jnp.abs(matmul(q, x).astype(jnp.float32) - want)) /
                                       jnp.maximum(jnp.max(jnp.abs(want)), 1e-30))
                rows.append(row)
    return rows


def block_rows(sizes: Sizes, interpret: bool, backend: str = "pallas") -> list[dict[str, Any]]:
    import fusec

    rows = []
    key = jax.random.key(1)
    d, heads = sizes.gpt2
    gpt2 = (lambda p, x: models.gpt2_block(p, x, heads), models.gpt2_params(key, d, jnp.bfloat16), d)
    ld, lheads, lkv, ff = sizes.llama
    llama = (lambda p, x: models.llama_block(p, x, lheads, lkv),
             models.llama_params(key, ld, lkv, lheads, ff, jnp.bfloat16), ld)
    for name, (fn, params, width) in {"gpt2 block": gpt2, "llama block": llama}.items():
        for b, s in sizes.batch_seq:
            x = jax.random.normal(key, (b, s, width), jnp.bfloat16)
            t = median_seconds(fusec.jit(fn, backend=backend, interpret=interpret), params, x, reps=sizes.reps)
            base = median_seconds(jax.jit(fn), params, x, reps=sizes.reps)
            rows.append(_row("model block", name, f"{b}x{s} d={width}", t, "jax.jit", base))
    return rows


def norm_rows(sizes: Sizes, interpret: bool, peak: float | None, backend: str = "pallas") -> list[dict[str, Any]]:
    from jax.experimental.pallas.ops.gpu import layer_norm, rms_norm, softmax

    import fusec

    rows, (r, c) = [], sizes.norm
    x = jax.random.normal(jax.random.key(2), (r, c), jnp.bfloat16)
    g, b = jnp.ones(c, jnp.bfloat16), jnp.zeros(c, jnp.bfloat16)
    cases = {
        # JAX's norm ops take [batch, seq, features].
        "layernorm": (lambda x, g, b: models._layer_norm(x, g, b),
                      lambda x, g, b: layer_norm.layer_norm(x[None], g, b, interpret=interpret)[0]),
        "rmsnorm": (lambda x, g, b: models._rms_norm(x, g),
                    lambda x, g, b: rms_norm.rms_norm(x[None], g, b, eps=1e-6, interpret=interpret)[0]),
        "softmax": (lambda x, g, b: jax.nn.softmax(x, axis=-1),
                    lambda x, g, b: softmax.softmax(x, axis=-1, interpret=interpret)),
    }
    for name, (fn, pallas_op) in cases.items():
        t = median_seconds(fusec.jit(fn, backend=backend, interpret=interpret), x, g, b, reps=sizes.reps)
        nbytes = 2 * x.nbytes
        rows.append(_row("norm", name, f"{r}x{c} bf16", t, "jax.jit",
                         median_seconds(jax.jit(fn), x, g, b, reps=sizes.reps), nbytes, peak))
        try:
            pallas_t = median_seconds(jax.jit(pallas_op), x, g, b, reps=sizes.reps)
            rows.append(_row("norm", name, f"{r}x{c} bf16", t, "jax pallas op", pallas_t, nbytes, peak))
        except Exception as e:  # a shipped op that does not run here is a row saying so, not a crash
            rows.append({"group": "norm", "row": name, "baseline": f"jax pallas op failed: {type(e).__name__}"})
    return rows


def attention_rows(sizes: Sizes, interpret: bool, peak: float | None, backend: str = "pallas"
                   ) -> list[dict[str, Any]]:
    """Prefill (causal) and decode (one query, a long cache) through fusec's attention kernel, vs
    ``jax.nn.dot_product_attention``'s XLA implementation and, on a GPU, its cuDNN one."""
    import fusec

    rows = []
    for b, h, tq, tk, d in sizes.attention:
        causal = tq == tk
        keys = jax.random.split(jax.random.key(5), 3)
        q, k, v = (jax.random.normal(kk, (b, t, h, d), jnp.bfloat16) for kk, t in zip(keys, (tq, tk, tk)))
        name, shape = "prefill causal" if causal else "decode", f"{b}x{h} heads, {tq}x{tk}, d={d} bf16"
        nbytes = 2 * (q.nbytes + k.nbytes + v.nbytes)  # Q, K, V read and O written once
        fused = fusec.jit(functools.partial(jax.nn.dot_product_attention, is_causal=causal, implementation="xla"),
                          backend=backend, interpret=interpret)
        t = median_seconds(fused, q, k, v, reps=sizes.reps)
        for impl in ("xla",) if interpret else ("xla", "cudnn"):
            try:
                base_fn = functools.partial(jax.nn.dot_product_attention, is_causal=causal, implementation=impl)
                base = median_seconds(jax.jit(base_fn), q, k, v, reps=sizes.reps)
                rows.append(_row("attention", name, shape, t, f"dot_product_attention {impl}", base, nbytes, peak))
            except Exception as e:  # cuDNN refusing a shape is a row saying so, not a crash
                rows.append({"group": "attention", "row": name, "baseline": f"{impl} failed: {type(e).__name__}"})
        if not causal:
            rows += cache_rows(q, k, v, interpret, peak, backend, sizes.reps)
    return rows


def cache_rows(q: Any, k: Any, v: Any, interpret: bool, peak: float | None, backend: str, reps: int
               ) -> list[dict[str, Any]]:
    """Decode over an int4 and an int2 ``fusec.lowprec.KVCache`` holding ``k``, ``v`` ([B, T, H, D]),
    vs ``jax.nn.dot_product_attention`` on the bf16 cache (cuDNN on a GPU); bytes: the cache's codes,
    scales and zero-points."""
    import fusec
    from fusec.lowprec import KVCache

    b, tk, h, d = k.shape
    qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, H, T, D]

    def attend(q: Any, cache: KVCache) -> Any:  # f32 scores and softmax, as models write decode
        s = jnp.einsum("bhqd,bhkd->bhqk", q, cache.keys(), preferred_element_type=jnp.float32) * float(d) ** -0.5
        s = jnp.where(cache.mask(), s, -jnp.inf)
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1).astype(q.dtype), cache.values())

    impl = "xla" if interpret else "cudnn"
    base_fn = jax.jit(functools.partial(jax.nn.dot_product_attention, implementation=impl))
    try:
        base = median_seconds(base_fn, q, k, v, reps=reps)
    except Exception:  # cuDNN refusing the shape: the XLA implementation instead
        impl, base = "xla", median_seconds(jax.jit(jax.nn.dot_product_attention), q, k, v, reps=reps)
    rows = []
    for bits in (4, 2):
        capacity = -(-tk // 64) * 64
        cache = jax.jit(lambda c, k, v: c.append(k, v))(KVCache.create(b, h, capacity, d, bits), kh, vh)
        fused = fusec.jit(attend, backend=backend, interpret=interpret)
        t = median_seconds(fused, qh, cache, reps=reps)
        rows.append(_row("attention", f"decode int{bits} KV cache", f"{b}x{h} heads, 1x{tk}, d={d}", t,
                         f"dot_product_attention {impl} (bf16 cache)", base, cache.nbytes + 2 * q.nbytes, peak))
    return rows


def compile_rows(sizes: Sizes, interpret: bool, backend: str = "pallas") -> list[dict[str, Any]]:
    import fusec

    d, heads = sizes.gpt2
    b, s = sizes.batch_seq[-1]
    fn = lambda p, x: models.gpt2_block(p, x, heads)  # noqa: E731
    params = models.gpt2_params(jax.random.key(3), d, jnp.bfloat16)
    x = jax.random.normal(jax.random.key(4), (b, s, d), jnp.bfloat16)
    t = first_call_seconds(fusec.jit(fn, backend=backend, interpret=interpret), params, x)
    base = first_call_seconds(jax.jit(fn), params, x)  # fusec.jit traced fn itself, not through jax.jit
    return [_row("compile", "gpt2 block first call", f"{b}x{s} d={d}", t, "jax.jit first call", base)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="tiny shapes in Pallas interpret mode (runs on a CPU)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--backend", default="pallas", help="fusec's code generator for every row")
    parser.add_argument("--only", default="lowbit,blocks,norms,attention,compile", help="comma-separated row groups")
    ns = parser.parse_args(argv)
    device = jax.devices()[0]
    if not ns.dry and device.platform != "gpu":
        print("bench.gpu needs a GPU (use --dry to check the script on a CPU)", file=sys.stderr)
        return 2
    sizes, interpret = (DRY, True) if ns.dry else (FULL, False)
    peak = None if ns.dry else peak_bandwidth(device.device_kind)
    t0 = time.perf_counter()
    groups = set(ns.only.split(","))
    rows: list[dict[str, Any]] = []
    if "lowbit" in groups:
        rows += lowbit_rows(sizes, interpret, peak, ns.backend)
    if "blocks" in groups:
        rows += block_rows(sizes, interpret, ns.backend)
    if "norms" in groups:
        rows += norm_rows(sizes, interpret, peak, ns.backend)
    if "attention" in groups:
        rows += attention_rows(sizes, interpret, peak, ns.backend)
    if "compile" in groups:
        rows += compile_rows(sizes, interpret, ns.backend)
    mode = ("dry run: tiny shapes, interpret mode" if ns.dry else "full") + f", backend {ns.backend}"
    title = (f"# fusec GPU suite on {device.device_kind} ({mode})"
             f", jax {jax.__version__}, peak bandwidth {'unknown' if peak is None else f'{peak / 1e12:.2f} TB/s'}")
    print(title)
    print(table(rows, COLUMNS))
    print(f"# {len(rows)} rows in {time.perf_counter() - t0:.0f} s")
    write_json(ns.json, {"backend": ns.backend, "device": device.device_kind, "dry": ns.dry, "jax": jax.__version__,
                         "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
