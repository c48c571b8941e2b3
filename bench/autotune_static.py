"""Writes fusec's shipped autotune file from the static sm_90 model (no GPU needed), or, on a GPU,
tunes the same kernels by timing them and stores the winners in an autotune cache.

    python -m bench.autotune_static [--limit 16] [--gpu h100] [--out fusec/data/autotune_shipped.json]
    python -m bench.autotune_static --method gpu [--limit 8] [--top 3] [--cache FILE]   # on a GPU
    python -m bench.autotune_static --dry     # a CPU check of the script: one small shape, 2 candidates

For the shapes of ``bench.sass_report`` (int4 g128, bfloat16 scales, K x N = 4096 x 14336 and
4096 x 4096, M = 1 and 16): every candidate tile config of each matmul kernel is compiled for
sm_90 on this machine and modeled (docs/gpu-model.md); the best goes to the shipped file, keyed by
kernel, shapes and dtypes. These entries are model-picked, not GPU-timed (the file says so).
With ``--method gpu`` the model's ``--top`` candidates are timed on the GPU and the winners go to
``--cache`` (default ``$FUSEC_AUTOTUNE_CACHE`` or ``~/.cache/fusec/autotune.json``), keyed by the
device; the shipped file is left alone.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from bench.sass_report import MS, SHAPES, _commit, weight_struct
from bench.timing import table

NOTE = ("Model-picked, not GPU-timed: each config is the static sm_90 model's best (docs/gpu-model.md) of its "
        "kernel's candidates, written by `python -m bench.autotune_static` ({date}, commit {commit}, jax {jax}, "
        "modeled on {gpu}). A GPU run's timings, in the user's cache ($FUSEC_AUTOTUNE_CACHE), take precedence.")
COLUMNS = ["shape", "kernel", "method", "candidates", "default", "default us", "best", "best us", "gain %"]


def _arguments(k: int, n: int, m: int, real: bool) -> tuple[Any, Any]:
    """The weight and activation: shapes only for the model, arrays for a GPU run."""
    if not real:
        return weight_struct(k, n), jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    from fusec import lowprec

    w = (jax.random.normal(jax.random.key(0), (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(jnp.bfloat16)
    return lowprec.quantize({"w": w}, lowprec.QuantSpec(4, 128))["w"], x


def main(argv: list[str] | None = None) -> int:
    from fusec.passes.tune_cache import SHIPPED, Entry, write_entries
    from fusec.tune import tune_function

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=16, help="candidates per kernel")
    parser.add_argument("--gpu", default="h100", help="the modeled GPU (h100 or h200)")
    parser.add_argument("--out", default=str(SHIPPED), help="the file to merge the model's entries into")
    parser.add_argument("--method", choices=("model", "gpu"), default="model")
    parser.add_argument("--top", type=int, default=3, help="candidates the model passes on to GPU timing")
    parser.add_argument("--cache", default=None, help="the autotune cache GPU-timed winners go to")
    parser.add_argument("--dry", action="store_true", help="one small shape, 2 candidates, nothing written")
    ns = parser.parse_args(argv)
    gpu_run = ns.method == "gpu"
    shapes, ms, limit = (((256, 256),), (1,), 2) if ns.dry else (SHAPES, MS, ns.limit)
    rows: list[dict[str, Any]] = []
    new: dict[str, Any] = {}
    for k, n in shapes:
        for m in ms:
            q, x = _arguments(k, n, m, gpu_run)
            for r in tune_function(lambda q, x: x @ q, q, x, method=ns.method, gpu=ns.gpu, top=ns.top, limit=limit,
                                   store=gpu_run and not ns.dry, path=ns.cache and Path(ns.cache)):
                times = dict(r.timed or r.modeled)
                default = r.kernel.default
                new[r.kernel.key().text(exact=False)] = Entry(r.best, "model", r.best_time_s).as_json()
                base = times.get(default, float("nan"))
                rows.append({"shape": f"M={m} K={k} N={n}", "kernel": r.kernel.name, "method": r.method,
                             "candidates": len(r.modeled), "default": default.label, "default us": base * 1e6,
                             "best": r.best.label, "best us": r.best_time_s * 1e6,
                             "gain %": 100 * (base / r.best_time_s - 1)})
                print(table(rows[-1:], COLUMNS), flush=True)
    print(table(rows, COLUMNS))
    if not gpu_run and not ns.dry:
        note = NOTE.format(date=datetime.date.today(), commit=_commit(), jax=jax.__version__, gpu=ns.gpu)
        write_entries(Path(ns.out), new, note=note)
        print(f"wrote {len(new)} entries to {ns.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
