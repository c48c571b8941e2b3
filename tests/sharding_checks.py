"""Sharded GPT-2 block checks on 8 CPU devices, run by tests/test_sharding.py in a subprocess
(the device count must be set before JAX starts). Prints one JSON object: per case, the largest
difference from jax.jit, both output shardings, the fusec kernels the compiled HLO runs (Pallas
interpret kernels carry their kernel's name, ``k_<kernel>``, in op metadata; a kernel re-built for
one shard's shapes ends in ``_shard``), and the all-gathers and all-reduces of both programs.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_checks.py [case ...]
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from quickstart import attention, example_inputs, gpt2_block, layer_norm  # noqa: E402

import fusec  # noqa: E402

MESH = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
KERNEL = re.compile(r'op_name="[^"]*?/(k_[A-Za-z0-9_]+?)(?:/|")')


def batched(x: jax.Array, p: dict) -> jax.Array:
    return jax.vmap(gpt2_block, (0, None))(x, p)


def tp_block(x: jax.Array, p: dict) -> jax.Array:
    """The block on one shard of a tensor-parallel MLP (columns of w_fc, rows of w_proj)."""
    x = x + attention(layer_norm(x, p["ln1_scale"], p["ln1_bias"]), p)
    h = jax.nn.gelu(layer_norm(x, p["ln2_scale"], p["ln2_bias"]) @ p["w_fc"] + p["b_fc"])
    return x + jax.lax.psum(h @ p["w_proj"], "x") + p["b_proj"]


def _specs(p: dict, tp: bool) -> dict:
    specs = {k: P() for k in p}
    if tp:
        specs |= {"w_fc": P(None, "x"), "b_fc": P("x"), "w_proj": P("x", None)}
    return specs


def _inputs(tp: bool) -> tuple[jax.Array, dict]:
    x, p = example_inputs()
    return (x if tp else jnp.stack([x * (1 + i / 8) for i in range(8)])), p


def _counts(hlo: str) -> dict[str, int]:
    return {"all_gather": len(re.findall(r"all-gather(?:-start)?\(", hlo)),
            "all_reduce": len(re.findall(r"all-reduce(?:-start)?\(", hlo))}


def _compare(compile_fusec: Callable[[], Any], jax_fn: Any, args: tuple[Any, ...]) -> dict[str, Any]:
    t0 = time.perf_counter()
    compiled = compile_fusec()
    out = compiled(*args)
    seconds = time.perf_counter() - t0
    reference = jax_fn.lower(*args).compile()
    ref = reference(*args)
    hlo = compiled.as_text()
    return {"error": float(jnp.max(jnp.abs(out - ref))), "sharding": str(out.sharding.spec),
            "jax_sharding": str(ref.sharding.spec), "kernels": sorted(set(KERNEL.findall(hlo))),
            "seconds": round(seconds, 2), "fusec": _counts(hlo), "jax": _counts(reference.as_text())}


def _jit_case(tp: bool, fun: Callable[..., Any] | None = None) -> dict[str, Any]:
    x, p = _inputs(tp)
    rows = NamedSharding(MESH, P() if tp else P("x"))
    shardings = (rows, {k: NamedSharding(MESH, s) for k, s in _specs(p, tp).items()})
    fun = fun or (gpt2_block if tp else batched)
    fj = fusec.jit(fun, backend="pallas", in_shardings=shardings, out_shardings=rows)
    args = jax.device_put((x, p), shardings)
    lowered = fj.lower(*args)
    result = _compare(lowered.compile, jax.jit(fun, in_shardings=shardings, out_shardings=rows), args)
    result["program_kernels"] = sorted(lowered.kernel_sources)
    result["fallbacks"] = [f.reason for f in lowered.fallbacks]
    return result


def _shard_map_case(tp: bool) -> dict[str, Any]:
    x, p = _inputs(tp)
    specs = _specs(p, tp)
    rows = P() if tp else P("x")
    body = tp_block if tp else batched
    wrap = lambda f: jax.jit(jax.shard_map(f, mesh=MESH, in_specs=(rows, specs), out_specs=rows))  # noqa: E731
    args = jax.device_put((x, p), (NamedSharding(MESH, rows), {k: NamedSharding(MESH, s) for k, s in specs.items()}))
    fused = wrap(fusec.jit(body, backend="pallas"))
    return _compare(lambda: fused.lower(*args).compile(), wrap(body), args)


def constrained(x: jax.Array, p: dict) -> jax.Array:
    """A nested jit with shardings and a sharding constraint around the batched block."""
    rows = NamedSharding(MESH, P("x"))
    y = jax.lax.with_sharding_constraint(x * 1.5, rows)
    inner = jax.jit(batched, in_shardings=(rows, NamedSharding(MESH, P())),
                    out_shardings=NamedSharding(MESH, P(None, None, "x")))
    return inner(y, p)


def mlp(x: jax.Array, p: dict) -> jax.Array:
    return jax.nn.gelu(x @ p["w_fc"] + p["b_fc"])


def _unpartitioned() -> dict[str, Any]:
    """FUSEC_PARTITION_KERNELS=0 (on a one-kernel program): the partitioner sees the kernel's code."""
    os.environ["FUSEC_PARTITION_KERNELS"] = "0"
    try:
        return _jit_case(False, mlp)
    finally:
        del os.environ["FUSEC_PARTITION_KERNELS"]


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    "dp_jit": lambda: _jit_case(False),
    "tp_jit": lambda: _jit_case(True),
    "dp_shard_map": lambda: _shard_map_case(False),
    "tp_shard_map": lambda: _shard_map_case(True),
    "constraints": lambda: _jit_case(False, constrained),
    "dp_jit_unpartitioned": _unpartitioned,
}


def main(names: list[str]) -> None:
    out: dict[str, Any] = {"devices": jax.device_count(), "jax": jax.__version__}
    for name in names or list(CASES):
        try:
            out[name] = CASES[name]()
        except Exception as e:  # reported, so the test names the case that broke
            out[name] = {"exception": f"{type(e).__name__}: {str(e)[:2000]}"}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
