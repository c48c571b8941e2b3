"""Writes fusec's shipped autotune file from the static sm_90 model (no GPU needed).

    python -m bench.autotune_static [--limit 16] [--gpu h100] [--out fusec/data/autotune_shipped.json]

For the shapes of ``bench.sass_report`` (int4 g128, bfloat16 scales, K x N = 4096 x 14336 and
4096 x 4096, M = 1 and 16): every candidate tile config of each matmul kernel is compiled for
sm_90 on this machine and modeled (docs/gpu-model.md); the best goes to the shipped file, keyed by
kernel, shapes and dtypes. These entries are model-picked, not GPU-timed (the file says so).
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
COLUMNS = ["shape", "kernel", "candidates", "default", "default us", "best", "best us", "gain %"]


def main(argv: list[str] | None = None) -> int:
    from fusec.passes.tune_cache import SHIPPED, Entry, write_entries
    from fusec.tune import tune_function

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=16, help="candidates per kernel")
    parser.add_argument("--gpu", default="h100", help="the modeled GPU (h100 or h200)")
    parser.add_argument("--out", default=str(SHIPPED), help="the file to merge the entries into")
    ns = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    new: dict[str, Any] = {}
    for k, n in SHAPES:
        q = weight_struct(k, n)
        for m in MS:
            x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
            for r in tune_function(lambda q, x: x @ q, q, x, method="model", gpu=ns.gpu, limit=ns.limit, store=False):
                modeled = dict(r.modeled)
                default = r.kernel.default
                new[r.kernel.key().text(exact=False)] = Entry(r.best, "model", r.best_time_s).as_json()
                base = modeled.get(default, float("nan"))
                rows.append({"shape": f"M={m} K={k} N={n}", "kernel": r.kernel.name, "candidates": len(r.modeled),
                             "default": default.label, "default us": base * 1e6, "best": r.best.label,
                             "best us": r.best_time_s * 1e6, "gain %": 100 * (base / r.best_time_s - 1)})
                print(table(rows[-1:], COLUMNS), flush=True)
    note = NOTE.format(date=datetime.date.today(), commit=_commit(), jax=jax.__version__, gpu=ns.gpu)
    write_entries(Path(ns.out), new, note=note)
    print(table(rows, COLUMNS))
    print(f"wrote {len(new)} entries to {ns.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
