"""The static sm_90 report of fusec's low-bit GEMV/GEMM kernels, on a CPU machine (no GPU needed).

    python -m bench.sass_report [--json out.json] [--markdown] [--backend pallas|triton] [--format int4|nf4|lut4]
        [--bits 2..8]

For int4 weights with group-128 scales (``QuantSpec(4, 128)``, from a bfloat16 weight, so scales
and output are bfloat16 as in ``bench.gpu``; ``--bits``: intB, quantize's default packing;
``--format nf4``: NormalFloat, ``lut4``: a table learned from the weight, fusec.lowprec.codebook),
K x N = 4096 x 14336 and 4096 x 4096, M = 1 and 16:
compiles ``x @ w`` under ``fusec.jit(backend=...)`` for sm_90, reads its SASS and models it
(``Lowered.gpu_profile``, docs/gpu-model.md) on H100 and H200. Every number printed is computed
here; none is typed in. The issue, conversion and latency terms do not depend on the GPU's HBM
bandwidth, so they are the same on both; "bound by" gives H100's and H200's when they differ.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
from dataclasses import replace
from typing import Any

import jax
import jax.numpy as jnp

from bench.timing import table, write_json

SHAPES = ((4096, 14336), (4096, 4096))
MS = (1, 16)
COLUMNS = ["shape", "config", "kernels", "programs", "split", "CTAs/SM", "regs", "spills", "loop instr", "instr/weight",
           "cvt/weight", "LDG bits", "KB in flight/SM", "roofline us H100", "issue us", "cvt us", "latency us",
           "modeled us H100",
           "% peak H100", "modeled us H200", "% peak H200", "bound by"]


FORMATS = ("int4", "nf4", "lut4")


def weight_struct(k: int, n: int, bits: int = 4, group: int = 128, fmt: str = "int4") -> Any:
    """A QuantizedArray of ``ShapeDtypeStruct`` leaves for a K x N weight: quantizes a K x 128 slice
    (fast on a CPU) and widens its planes and scales to N columns; lowering needs only shapes.
    ``fmt``: int4 (``bits``-bit ints), nf4, or lut4 (a 4-bit table learned from that slice)."""
    import numpy as np

    from fusec import lowprec
    from fusec.lowprec.codebook import learn_table

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    w = (jax.random.normal(jax.random.key(0), (k, 128), jnp.float32) * 0.02).astype(jnp.bfloat16)
    spec = lowprec.QuantSpec(bits, group)
    if fmt == "nf4":
        spec = lowprec.QuantSpec(4, group, "nf")
    elif fmt == "lut4":
        table = learn_table(np.asarray(w, np.float64), np.ones(k), 4, group).lut
        spec = lowprec.QuantSpec(4, group, "lut", lut=table)
    q = lowprec.quantize({"w": w}, spec)["w"]
    wide = lambda a: None if a is None else jax.ShapeDtypeStruct((a.shape[0], n), a.dtype)  # noqa: E731
    return replace(q, planes=tuple(wide(p) for p in q.planes), scales=wide(q.scales), zeros=wide(q.zeros),
                   shape=(k, n))


def rows(backend: str = "pallas", fmt: str = "int4", bits: int = 4) -> list[dict[str, Any]]:
    import fusec
    from fusec.report import gpu_config_of

    matmul = fusec.jit(lambda q, x: x @ q, backend=backend, interpret=False)
    out = []
    for k, n in SHAPES:
        q = weight_struct(k, n, bits, fmt=fmt)
        for m in MS:
            lowered = matmul.lower(q, jax.ShapeDtypeStruct((m, k), jnp.bfloat16))
            h100, h200 = (lowered.gpu_profile(90, gpu) for gpu in ("h100", "h200"))
            a, b = _weight_kernel(h100), _weight_kernel(h200)
            # A split-K GEMV finishes a cast-only epilogue (here to bfloat16) itself; any other
            # epilogue is a second, small kernel: the modeled time is all kernels', one after the
            # other; % peak is the weight kernel's compulsory bytes at peak bandwidth over that time.
            t100, t200 = (sum(x.modeled_us for x in p.kernels) for p in (h100, h200))
            op = next(o for o in lowered.program.module.entry.ops if o.attr("kind") == "matmul")
            out.append({"shape": f"M={m} K={k} N={n}", "config": gpu_config_of(op, lowered.program.module),
                        "kernels": len(h100.kernels), "programs": a.programs,
                        "split": a.split,
                        "CTAs/SM": f"{a.ctas_per_sm} ({a.modeled.occupancy.limiter})", "regs": a.registers,
                        "spills": a.spills, "loop instr": a.hot_loop_instructions,
                        "instr/weight": a.instructions_per_element, "cvt/weight": a.conversions_per_element,
                        "LDG bits": "/".join(map(str, a.global_load_bits)),
                        "KB in flight/SM": a.inflight_bytes_per_sm / 1024, "roofline us H100": a.roofline_bound_s * 1e6,
                        "issue us": a.modeled.issue_s * 1e6, "cvt us": a.modeled.conversion_s * 1e6,
                        "latency us": a.modeled.latency_s * 1e6, "modeled us H100": t100,
                        "% peak H100": 100 * a.peak_share * a.modeled_us / t100,
                        "modeled us H200": t200, "% peak H200": 100 * b.peak_share * b.modeled_us / t200,
                        "bound by": a.modeled.bound_by if a.modeled.bound_by == b.modeled.bound_by
                        else f"{a.modeled.bound_by} / {b.modeled.bound_by}"})
    return out


def _weight_kernel(profile: Any) -> Any:
    """The kernel that reads the low-bit weight (the GEMV/GEMM itself)."""
    return next(k for k in profile.kernels if k.per == "weight")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the rows as JSON")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--backend", default="pallas", choices=("pallas", "triton"), help="fusec's GPU code generator")
    parser.add_argument("--format", default="int4", choices=FORMATS, help="the weight's low-bit format")
    parser.add_argument("--bits", type=int, default=4, help="integer weight bits with --format int4 (quantize's "
                        "default packing)")
    ns = parser.parse_args(argv)
    if ns.bits != 4 and ns.format != "int4":
        parser.error(f"--bits {ns.bits} is for integer weights; --format {ns.format} is 4-bit")
    measured = rows(ns.backend, ns.format, ns.bits)
    name = f"int{ns.bits}" if ns.format == "int4" else ns.format
    head = (f"# fusec static sm_90 report, {name} g128 GEMV/GEMM, backend {ns.backend}: {datetime.date.today()}, "
            f"commit {_commit()}, jax {jax.__version__}")
    print(head)
    if ns.markdown:
        def cell(v: Any) -> str:
            return f"{v:.4g}" if isinstance(v, float) else str(v)
        print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
        for r in measured:
            print("| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |")
    else:
        print(table(measured, COLUMNS))
    write_json(ns.json, {"title": head, "rows": measured})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
