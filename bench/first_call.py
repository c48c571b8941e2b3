"""First-call time of the examples' train steps: ``jax.jit`` against ``fusec.jit`` (Pallas backend,
interpret mode on a CPU), split into where the time goes.

    python -m bench.first_call [--json out.json] [--models gpt2,linen,llama,equinox,haiku]

Each measurement runs in a fresh process (no cache of an earlier one helps it). ``jax.jit``'s
first call is trace + lower + compile. fusec's is trace (the user's function to a jaxpr), fusec's
frontend and passes, codegen (kernel sources), emit (the generated code run on tracers, where Pallas
traces each kernel body), then JAX's lower and XLA's compile of the whole program. The train step of
an example is its own ``train_step`` where it has one, else a step of SGD on a mean-square loss.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from bench.timing import table, write_json

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MODELS = ("gpt2", "linen", "llama", "equinox", "haiku")


def _sgd_step(forward: Any, params_first: bool = True) -> Any:
    def step(params: Any, x: jax.Array, target: jax.Array) -> tuple[Any, jax.Array]:
        def loss(p: Any) -> jax.Array:
            out = forward(p, x) if params_first else forward(x, p)
            return jnp.mean((out - target) ** 2)
        value, grads = jax.value_and_grad(loss)(params)
        return jax.tree.map(lambda p, g: p - 1e-2 * g, params, grads), value
    return step


def make_case(name: str) -> tuple[Any, tuple[Any, ...]]:
    """(train step, its arguments) for an example model."""
    sys.path.insert(0, str(EXAMPLES))
    if name == "gpt2":
        import quickstart
        x, params = quickstart.example_inputs()
        return _sgd_step(quickstart.gpt2_block, params_first=False), (params, x, jnp.ones_like(x))
    if name == "linen":
        import linen_block
        params, x = linen_block.example_inputs()
        return _sgd_step(linen_block.forward), (params, x, jnp.ones_like(x))
    if name == "haiku":
        import haiku_block
        params, x = haiku_block.example_inputs()
        return _sgd_step(haiku_block.forward), (params, x, jnp.ones_like(x))
    if name == "llama":
        import llama_nnx as module
    elif name == "equinox":
        import equinox_block as module
    else:
        raise ValueError(f"unknown model {name!r}; models are {', '.join(MODELS)}")
    params, x = module.example_inputs()
    return module.train_step, (params, module.OPTIMIZER.init(params), x, jnp.ones_like(x))


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def worker(name: str, mode: str) -> dict[str, Any]:
    """One first call, in this (fresh) process."""
    import fusec

    step, args = make_case(name)
    out: dict[str, Any] = {"model": name, "mode": mode}
    if mode == "jax":
        traced, out["trace"] = _timed(jax.jit(step).trace, *args)
    else:
        lowered, seconds = _timed(fusec.jit(step, backend="pallas", interpret=True).lower, *args)
        out.update(lowered.timings)
        out["kernels"] = len(lowered.program.kernels)
        out["distinct"] = len(lowered.program.distinct_kernels)
        traced = lowered.jax_traced
    lowered_hlo, out["lower"] = _timed(traced.lower)
    compiled, out["compile"] = _timed(lowered_hlo.compile)
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    out["first run"] = time.perf_counter() - t0
    out["total"] = sum(v for k, v in out.items() if isinstance(v, float))
    return out


def measure(name: str, mode: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.first_call", "--worker", name, mode]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def rows_for(models: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in models:
        jax_run, fusec_run = measure(name, "jax"), measure(name, "fusec")
        own = fusec_run["frontend"] + fusec_run["passes"] + fusec_run["codegen"]
        rows.append({"model": name, "jax.jit total s": jax_run["total"], "jax trace": jax_run["trace"],
                     "jax lower": jax_run["lower"], "jax compile": jax_run["compile"],
                     "fusec total s": fusec_run["total"], "trace": fusec_run["trace"],
                     "frontend": fusec_run["frontend"], "passes": fusec_run["passes"],
                     "codegen": fusec_run["codegen"], "emit": fusec_run["emit"], "lower": fusec_run["lower"],
                     "compile": fusec_run["compile"], "kernels": fusec_run["kernels"],
                     "distinct kernels": fusec_run["distinct"],
                     "passes+codegen / jax compile": own / jax_run["compile"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.first_call", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated example models")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.worker:
        print(json.dumps(worker(*ns.worker)))
        return 0
    print(f"# first call of the examples' train steps: jax {jax.__version__}, {jax.devices()[0].device_kind}; "
          "fusec: Pallas backend, interpret mode; seconds, each row two fresh processes")
    rows = rows_for(ns.models.split(","))
    print(table(rows, list(rows[0])))
    write_json(ns.json, {"jax": jax.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
