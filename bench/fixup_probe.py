"""A measurement, not a feature: what a one-kernel split-K GEMV (a serial fixup in the same kernel)
would model at on sm_90, from the SASS of a real kernel (issue 16, 4096 x 4096 "Done when" lines).

    python -m bench.fixup_probe [--check]     # --check: also run a small fixup kernel in the Triton interpreter

For int4 g128 (bfloat16 scales and output), K x N = 4096 x 4096, M = 1 and 16, it takes the Triton
backend's split-K GEMV as fusec generates it today (shipped config) and rewrites only its last
statement, the atomic add of the partial sum into a zeroed f32 output, into the fixup: add into an
f32 workspace (``red``), a CTA barrier, one thread's acq_rel atomic increment of the output tile's
arrival counter (returning the old value), and, in the program that arrives last, a reload of the
finished sum (``.cg``, from L2), the cast, and a store of the output, both masked by "last" and by
the array bounds. That kernel is compiled for sm_90 here and modeled (docs/gpu-model.md) with the
fixup's tail charged as ``tail_round_trips`` = 3 L2 round trips (release, counter, reload).

It prints both designs side by side: today's two kernels (GEMV + cast) and the one-kernel fixup.
Neither charges the zeroing of the workspace/counters (an XLA memset before the kernel; today's
split-K output is zeroed the same way, uncharged) -- see docs/gpu-model.md, "Split-K tails".
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench.sass_report import weight_struct
from bench.timing import table

_TAIL = re.compile(r"^(\s*)tl\.atomic_add\((p_out0 \+ (.+?)), (v_\w+)(?:, mask=(.+))?\)$", re.M)
_OFFSETS = re.compile(r"^\s*(p_out0_o[01]) = (.+)$", re.M)


def fixup_kernel(kernel: Any, split: int) -> Any:
    """``kernel`` (a split-K TritonKernel adding into a zeroed f32 output) rewritten to finish in
    the same kernel: outputs (out bf16, workspace f32, counters i32), the last two zeroed."""
    src = kernel.source
    found = list(_TAIL.finditer(src))
    if len(found) != 1:
        raise ValueError(f"kernel {kernel.name}: expected one atomic add of the output, found {len(found)}")
    m = found[0]
    pad, target, offsets, value, mask = m.group(1), m.group(2), m.group(3), m.group(4), m.group(5)
    (rows, cols) = kernel.outputs[0].shape
    inside = f"({mask}) & " if mask else ""
    grid_n = kernel.grid[1]
    tail = "\n".join(pad + line for line in (
        f"p_ws_at = p_ws + {offsets}",
        f"tl.atomic_add(p_ws_at, {value}, {'mask=' + mask + ', ' if mask else ''}sem='relaxed')",
        "tl.debug_barrier()  # every thread's adds are issued before the release below",
        f"v_arrived = tl.atomic_add(p_cnt + (tl.program_id(0) * {grid_n} + tl.program_id(1)), 1, sem='acq_rel')",
        f"v_last = (tl.full((1, 1), 0, tl.int32) + v_arrived) == {split - 1}  # a [1, 1] tile: a mask",
        f"v_total = tl.load(p_ws_at, mask={inside}v_last, other=0.0, cache_modifier='.cg')",
        f"tl.store({target}, v_total.to(tl.bfloat16), mask={inside}v_last)",
    ))
    src = src[:m.start()] + tail + src[m.end():]
    src = re.sub(rf"(def {kernel.name}\([^)]*p_out0)\)", r"\1, p_ws, p_cnt)", src, count=1)
    from fusec.codegen.triton.kernel import ArraySig

    outs = (ArraySig((rows, cols), "bfloat16"), ArraySig((rows, cols), "float32"),
            ArraySig((kernel.grid[0] * grid_n,), "int32"))
    return dataclasses.replace(kernel, source=src, outputs=outs, zeroed_outputs=(1, 2))


def _lowered(m: int, k: int, n: int, q: Any = None) -> Any:
    import fusec

    q = weight_struct(k, n) if q is None else q
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    return fusec.jit(lambda q, x: x @ q, backend="triton", interpret=False).lower(q, x)


def _weight_spec(lowered: Any) -> tuple[Any, Any]:
    module = lowered.program.module
    op = next(o for o in module.entry.ops if o.opcode == "kernel" and o.attr("kind") == "matmul")
    spec = lowered.program.kernels[str(op.attr("callee"))].for_gpu()
    return op, spec


def rows() -> list[dict[str, Any]]:
    from fusec.runtime.gpu_model import H100, H200, model
    from fusec.runtime.gpu_work import kernel_work
    from fusec.runtime.triton_compile import compile_triton_kernel

    out = []
    for m in (1, 16):
        k, n = 4096, 4096
        lowered = _lowered(m, k, n)
        two = {g: lowered.gpu_profile(90, g) for g in ("h100", "h200")}
        op, spec = _weight_spec(lowered)
        split = int(spec.op.attr("split", 1))
        trips = max(int(o.attr("trips")) for f in [spec.op] for o in
                    lowered.program.module.function(str(spec.op.attr("tile"))).ops if o.opcode == "loop")
        fixed = fixup_kernel(spec.backend_kernel, split)
        ck = compile_triton_kernel(fixed, 90)
        # Compulsory bytes: what the GEMV reads, the bf16 output, the f32 workspace (written back
        # from L2 eventually) and the counters.
        read = int(op.attr("bytes_read"))
        written = m * n * 2 + m * n * 4 + 4 * fixed.outputs[2].shape[0]
        row: dict[str, Any] = {"shape": f"M={m} K={k} N={n}", "config": spec.op.attr("block"), "split": split}
        for g, spec_g in (("H100", H100), ("H200", H200)):
            prof = two[g.lower()]
            weight = next(x for x in prof.kernels if x.per == "weight")
            total = sum(x.modeled_us for x in prof.kernels)
            work, _, _ = kernel_work(ck, trips, read + written, spec_g)
            fix = model(dataclasses.replace(work, tail_round_trips=3), spec_g)
            row[f"2 kernels us {g}"] = total
            # % of peak as bench.sass_report gives it: the GEMV's compulsory bytes at peak over the time.
            row[f"2 kernels % {g}"] = 100 * weight.modeled.bandwidth_s * 1e6 / total
            row[f"fixup us {g}"] = fix.time_s * 1e6
            row[f"fixup % {g}"] = 100 * fix.bandwidth_share
            if g == "H100":
                row |= {"fixup regs": ck.resources.registers, "spills": ck.resources.spills,
                        "tail us": fix.tail_s * 1e6, "fixup bound": fix.bound_by}
        out.append(row)
    return out


def check() -> None:
    """The fixup kernel of a small split-K GEMV (M=3, K=512, N=512: split 2, rows masked) in the
    Triton interpreter, bounds-checked, against today's kernel plus the cast: bit-equal."""
    import ml_dtypes

    from fusec import lowprec
    from fusec.codegen.triton.interpret import run_interpreted

    m, k, n = 3, 512, 512
    w = (jax.random.normal(jax.random.key(0), (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
    q = lowprec.quantize({"w": w}, lowprec.QuantSpec(4, 128))["w"]
    x = np.asarray(jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(jnp.bfloat16))
    _, spec = _weight_spec(_lowered(m, k, n, q))
    split = int(spec.op.attr("split", 1))
    assert split > 1, f"the small shape should split its K loop, got split={split}"
    arrays = [np.asarray(p) for p in q.planes] + [np.asarray(q.scales), x]
    kernel = spec.backend_kernel
    actual = tuple(type(kernel.inputs[0])(tuple(a.shape), np.dtype(a.dtype).name) for a in arrays)
    kernel = dataclasses.replace(kernel, inputs=actual)
    (acc,) = run_interpreted(kernel, *arrays, check_bounds=True)
    out, _, counters = run_interpreted(fixup_kernel(kernel, split), *arrays, check_bounds=True)
    want = acc.astype(ml_dtypes.bfloat16)
    assert (counters == split).all(), counters
    assert np.array_equal(out.view(np.uint16), want.view(np.uint16)), "fixup output differs"
    print(f"check: fixup kernel (split {split}, grid {kernel.grid}) bit-equal to GEMV + cast in the interpreter")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="also check a small fixup kernel in the interpreter")
    ns = parser.parse_args(argv)
    if ns.check:
        check()
    measured = rows()
    print(table(measured, list(measured[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
