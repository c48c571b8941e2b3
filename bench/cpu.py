"""The CPU suite: what a CPU can honestly measure about fusec on every change.

    python -m bench.cpu [--json out.json] [--depths 1,2,4,8,16]

- compile overhead: first call of ``jax.jit`` vs ``fusec.jit`` (reference backend, which runs on a
  CPU) on a GPT-2 and a Llama block, and the time fusec takes to build the Pallas program (trace,
  passes, codegen; nothing runs), with each pass's share. Each measurement runs in a fresh
  process, so no cache of an earlier one helps it; peak memory is that process's peak RSS.
- cost model: kernels, and bytes moved fused vs op by op, against XLA's own ``bytes accessed``
  (``jax.jit(f).lower(...).compile().cost_analysis()``, for the CPU's own fusion).
- scaling: compile times of an N-layer GPT-2 stack for each N in ``--depths``, and the exponent of
  the best power-law fit (1.0 is linear), so super-linear passes show up.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from typing import Any

import jax

from bench import models
from bench.timing import first_call_seconds, table, write_json

D, HEADS, KV_HEADS, FF, BATCH, SEQ = 256, 4, 2, 512, 1, 64


def make_case(name: str, depth: int = 1) -> tuple[Any, tuple[Any, ...]]:
    """(function, arguments) for a benchmark case."""
    key = jax.random.key(0)
    x = jax.random.normal(key, (BATCH, SEQ, D))
    if name == "gpt2":
        layers = [models.gpt2_params(jax.random.fold_in(key, i), D) for i in range(depth)]
        return (lambda layers, x: models.gpt2_stack(layers, x, HEADS)), (layers, x)
    if name == "llama":
        params = models.llama_params(key, D, KV_HEADS, HEADS, FF)
        return (lambda p, x: models.llama_block(p, x, HEADS, KV_HEADS)), (params, x)
    raise ValueError(f"unknown case {name!r}")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(name: str, depth: int, mode: str) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    import fusec

    fn, args = make_case(name, depth)
    out: dict[str, Any] = {"case": name, "depth": depth, "mode": mode}
    if mode == "jax":
        out["seconds"] = first_call_seconds(jax.jit(fn), *args)
    elif mode == "fusec-xla":
        out["seconds"] = first_call_seconds(fusec.jit(fn, backend="xla"), *args)
    else:  # fusec-pallas: build the Pallas program only
        t0 = time.perf_counter()
        lowered = fusec.jit(fn, backend="pallas", interpret=True).lower(*args)
        out["seconds"] = time.perf_counter() - t0
        out["stages"] = [[stage, seconds] for stage, seconds in lowered.program.stage_seconds if stage != "trace"]
        out["kernels"] = len(lowered.program.kernels)
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def measure(name: str, depth: int, mode: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.cpu", "--worker", name, str(depth), mode]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _median_run(name: str, mode: str, repeats: int = 3) -> dict[str, Any]:
    """The run with the median time of ``repeats`` fresh processes."""
    runs = sorted((measure(name, 1, mode) for _ in range(repeats)), key=lambda r: r["seconds"])
    return runs[len(runs) // 2]


def cost_rows() -> list[dict[str, Any]]:
    import fusec

    rows = []
    for name in ("gpt2", "llama"):
        fn, args = make_case(name)
        report = fusec.inspect(fn, *args, backend="pallas", interpret=True)
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        rows.append({"model": name, "eqns": report.num_eqns, "fused eqns": report.num_fused_eqns,
                     "kernels": len(report.kernels), "xla ops": len(report.xla_ops),
                     "bytes fused": report.bytes_fused, "bytes op-by-op": report.bytes_op_by_op,
                     "fused/op-by-op": report.bytes_fused / report.bytes_op_by_op,
                     "XLA bytes accessed": int(cost.get("bytes accessed", 0))})
    return rows


def fit_exponent(depths: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) against log(depth)."""
    xs, ys = [math.log(d) for d in depths], [math.log(s) for s in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--depths", default="1,2,4,8,16", help="layer counts for the scaling rows")
    parser.add_argument("--worker", nargs=3, metavar=("CASE", "DEPTH", "MODE"), help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.worker:
        print(json.dumps(worker(ns.worker[0], int(ns.worker[1]), ns.worker[2])))
        return 0
    t_start = time.perf_counter()
    print(f"# fusec CPU suite: jax {jax.__version__}, {jax.devices()[0].device_kind}, "
          f"models d={D}, batch x seq {BATCH}x{SEQ}")
    compile_rows, shares = [], []
    for name in ("gpt2", "llama"):
        runs = {mode: _median_run(name, mode) for mode in ("jax", "fusec-xla", "fusec-pallas")}
        pallas = runs["fusec-pallas"]
        compile_rows.append({"model": name, "jax.jit first call s": runs["jax"]["seconds"],
                             "fusec.jit (xla) first call s": runs["fusec-xla"]["seconds"],
                             "fusec pallas build s": pallas["seconds"], "kernels": pallas["kernels"],
                             "peak MB jax": runs["jax"]["peak_rss_mb"],
                             "peak MB fusec (xla)": runs["fusec-xla"]["peak_rss_mb"],
                             "peak MB fusec (pallas)": pallas["peak_rss_mb"]})
        per_pass: dict[str, float] = {}
        for stage, seconds in pallas["stages"]:  # cse and dce run more than once: add their runs up
            per_pass[stage] = per_pass.get(stage, 0.0) + seconds
        total = sum(per_pass.values())
        shares.append({"model": name, **{stage: f"{s / total:.0%}" for stage, s in per_pass.items()}})
    print("\n## compile overhead (fresh process each)\n" + table(compile_rows, list(compile_rows[0])))
    stage_columns = list(dict.fromkeys(k for row in shares for k in row))
    print("\n## share of the Pallas build, per stage (a pass run more than once: all its runs)\n"
          + table(shares, stage_columns))
    costs = cost_rows()
    print("\n## cost model (bytes moved) vs XLA's own estimate\n" + table(costs, list(costs[0])))
    depths = [int(d) for d in ns.depths.split(",")]
    scaling = []
    for depth in depths:
        row: dict[str, Any] = {"layers": depth}
        for mode in ("jax", "fusec-xla", "fusec-pallas"):
            row[f"{mode} s"] = measure("gpt2", depth, mode)["seconds"]
        scaling.append(row)
    # Fixed costs flatten the curve at small depths, so the fit also runs over the deepest three.
    tail = depths[-3:]
    exponents = {f"{mode} ({label})": fit_exponent(ds, [r[f"{mode} s"] for r in scaling if r["layers"] in ds])
                 for mode in ("jax", "fusec-xla", "fusec-pallas")
                 for label, ds in ((f"{depths[0]}-{depths[-1]}", depths), (f"{tail[0]}-{tail[-1]}", tail))
                 if len(ds) > 1}
    print("\n## compile time vs depth (GPT-2 stack)\n" + table(scaling, list(scaling[0])))
    if exponents:
        print("power-law exponent (1 = linear): " + ", ".join(f"{m} {e:.2f}" for m, e in exponents.items()))
    elapsed = time.perf_counter() - t_start
    print(f"\n# suite time {elapsed:.0f} s")
    write_json(ns.json, {"jax": jax.__version__, "compile": compile_rows, "stage_shares": shares,
                         "cost": costs, "scaling": scaling, "scaling_exponents": exponents, "seconds": elapsed})
    return 0


if __name__ == "__main__":
    sys.exit(main())
