"""How much of each example model's parameters a 4-bit quantization puts in fused low-bit kernels.

    python -m bench.lowbit_coverage

For each example (Flax NNX Llama, Linen, Equinox, Haiku blocks and the quickstart's GPT-2 block):
``contraction_axes`` finds each weight's contracted axes from the forward function, ``quantize``
packs what it can (``QuantSpec(4, group=32)``), ``plan`` says what stayed float and why, and the
fused program says which packed weights a low-bit matmul kernel reads. Prints a table; nothing is
timed, so the numbers are exact and the same on every machine.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax

import fusec
from fusec import lowprec
from fusec.ir import LowBitType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
SPEC = lowprec.QuantSpec(4, 32)


def _examples() -> list[tuple[str, Any, Any, Any, int]]:
    """(name, forward, params, x, params' argument position)."""
    import quickstart

    x, p = quickstart.example_inputs()
    out: list[tuple[str, Any, Any, Any, int]] = [("quickstart GPT-2 block", quickstart.gpt2_block, p, x, 1)]
    for module in ("llama_nnx", "linen_block", "equinox_block", "haiku_block"):
        try:
            ex = __import__(module)
        except ImportError as e:  # a model library the examples extra would install
            print(f"skipping {module}: {e}")
            continue
        params, x = ex.example_inputs()
        out.append((module, ex.forward, params, x, 0))
    return out


def coverage(fn: Any, params: Any, x: Any, argnum: int) -> dict[str, Any]:
    args = [x, x]
    args[argnum] = params
    axes = lowprec.contraction_axes(fn, *args, argnum=argnum)
    entries = lowprec.plan(params, SPEC, axes=axes)
    q = lowprec.quantize(params, SPEC, axes=axes)
    args[argnum] = q
    module = fusec.jit(fn, backend="pallas").lower(*args).program.module
    in_kernels = sum(v.type.size * 4 for op in module.entry.ops if op.opcode == "kernel"  # f32 bytes
                     for v in op.operands if isinstance(v.type.elem, LowBitType))
    total = sum(e.nbytes for e in entries)
    matrices = [e for e in entries if len(jax.numpy.shape(_leaf(params, e.path))) >= 2]
    return {"leaves": len(entries), "quantized": sum(e.quantized for e in entries),
            "matrices_left": [(e.path, e.reason) for e in matrices if not e.quantized],
            "quantized_share": sum(e.nbytes for e in entries if e.quantized) / total,
            "low_bit_kernel_share": in_kernels / total}


def _leaf(params: Any, path: str) -> Any:
    for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if (jax.tree_util.keystr(p) or "<root>") == path:
            return leaf
    raise KeyError(path)


def main() -> None:
    print(f"{'model':24s} {'leaves':>6s} {'quantized':>9s} {'bytes quantized':>15s} {'bytes in low-bit kernels':>24s}")
    for name, fn, params, x, argnum in _examples():
        c = coverage(fn, params, x, argnum)
        print(f"{name:24s} {c['leaves']:6d} {c['quantized']:9d} {c['quantized_share']:15.1%} "
              f"{c['low_bit_kernel_share']:24.1%}")
        for path, reason in c["matrices_left"]:
            print(f"    left float: {path}: {reason}")


if __name__ == "__main__":
    main()
