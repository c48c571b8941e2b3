"""Calibrated quantization on the library examples (Flax NNX Llama, Linen, Equinox, Haiku blocks):
relative output error against the float model, RTN vs GPTQ + scale search, at 4 and 3 bits.

    python -m bench.calibrate_examples

Calibration inputs and evaluation inputs are different random draws of the example's input shape
(the examples have random weights, so there is no text to calibrate on): 64 calibration draws
(1024 rows, 8x the largest contracted size; with 8 draws, 128 rows, H = X^T X was rank-deficient
for the 128-row matrices and GPTQ fitted the sample's noise: no gain over RTN on the Llama block at
4 bits), 4 evaluation draws. Group 32, int, bf16 scales, calibrate's defaults (act-order, damping
0.1); the error is ||y_q - y|| / ||y|| over the evaluation inputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np

from fusec import lowprec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))


def _error(forward, q, evaluation: list, ref: list) -> float:
    got = [np.asarray(forward(lowprec.dequantize(q), e)) for e in evaluation]
    return float(np.sqrt(sum(np.sum((g - r) ** 2) for g, r in zip(got, ref)) / sum(np.sum(r ** 2) for r in ref)))


def main() -> None:
    print(f"{'example':16s} {'bits':>4s} {'RTN':>8s} {'GPTQ':>8s} {'matrices':>8s}")
    for module in ("llama_nnx", "linen_block", "equinox_block", "haiku_block"):
        try:
            ex = __import__(module)
        except ImportError as e:
            print(f"skipping {module}: {e}")
            continue
        params, x = ex.example_inputs()
        draws = [jax.random.normal(jax.random.key(s), x.shape, x.dtype) for s in (*range(10, 74), *range(100, 104))]
        calibration, evaluation = [(d,) for d in draws[:64]], draws[64:]
        ref = [np.asarray(ex.forward(params, e)) for e in evaluation]
        for bits in (4, 3):
            rtn = lowprec.calibrate(ex.forward, params, calibration, bits=bits, group=32, method="rtn", search=False)
            gptq, rep = lowprec.calibrate(ex.forward, params, calibration, bits=bits, group=32, with_report=True)
            print(f"{module:16s} {bits:4d} {_error(ex.forward, rtn, evaluation, ref):8.4f} "
                  f"{_error(ex.forward, gptq, evaluation, ref):8.4f} {len(rep.matrices):8d}", flush=True)


if __name__ == "__main__":
    main()
