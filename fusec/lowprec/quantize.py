"""Group-wise quantization of a weight array, in NumPy (the reference kernels are checked against).

A [K, N] weight gets one scale per group of ``group`` rows along K (the reduction axis) and column:
scales [K / group, N] (``group=None``: one per column, "per channel"). Symmetric formats map the
group's largest magnitude onto the format's symmetric range; ``uint`` is asymmetric, with a
zero-point code per group. Scales are rounded up to their dtype, so no value leaves the range.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from fusec.lowprec.formats import Format

SCALE_DTYPES = {"f32": np.float32, "bf16": ml_dtypes.bfloat16, "f16": np.float16}


@dataclass(frozen=True)
class QuantizedCodes:
    codes: np.ndarray  # uint8 [K, N]
    scales: np.ndarray  # [K / group, N] in the scale dtype
    zeros: np.ndarray | None  # uint8 [K / group, N] zero-point codes (uint only)
    fmt: Format
    group: int


def symmetric_range(fmt: Format) -> float:
    """The magnitude a group's largest |w| maps to: the smaller end of the table, or its larger end
    where the smaller is 0 (1-bit signed ints hold only -1 and 0)."""
    values = fmt.finite_values
    fit = min(float(values.max()), float(-values.min()))
    return fit if fit > 0 else fmt.max_abs


def error_bound(fmt: Format, scales: np.ndarray) -> np.ndarray:
    """The largest |w - dequantize(quantize(w))| the format allows per group, for groups scaled by
    ``scales``: half the widest gap between neighbouring values, or the distance the symmetric
    range reaches past the table's end, times the scale."""
    if fmt.family == "uint":
        # Half a step from rounding w / s, half a step from rounding the zero-point.
        return np.asarray(scales, np.float64) * 1.0
    values = fmt.finite_values
    r = symmetric_range(fmt)
    overshoot = max(0.0, r - float(values.max()), -r - float(values.min()))
    return np.asarray(scales, np.float64) * max(fmt.max_gap / 2, overshoot)


def _round_up(x: np.ndarray, dtype: type) -> np.ndarray:
    y = x.astype(dtype)
    low = y.astype(np.float64) < x
    return np.where(low, np.nextafter(y, np.asarray(np.inf, dtype)), y).astype(dtype)


def quantize_codes(w: np.ndarray, fmt: Format, group: int | None = None, scale_dtype: str = "f32") -> QuantizedCodes:
    """Quantizes a float [K, N] array; ``group`` must divide K."""
    w = np.asarray(w)
    if w.ndim != 2 or not np.issubdtype(np.asarray(w).dtype, np.floating) and w.dtype.kind != "V":
        raise ValueError(f"expected a 2-D float weight, got {w.dtype} with shape {w.shape}")
    k, n = w.shape
    g = k if group is None else group
    if g <= 0 or k % g:
        raise ValueError(f"group size {g} does not divide the reduction axis of size {k}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale dtype must be one of {sorted(SCALE_DTYPES)}, got {scale_dtype!r}")
    blocks = w.astype(np.float64).reshape(k // g, g, n)
    if fmt.family == "uint":
        lo, hi = blocks.min(axis=1), blocks.max(axis=1)
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)  # keep 0 exact
        scale = _round_up(np.where(hi > lo, (hi - lo) / (2**fmt.bits - 1), 1.0), SCALE_DTYPES[scale_dtype])
        s = scale.astype(np.float64)
        zero = np.clip(np.round(-lo / s), 0, 2**fmt.bits - 1)
        codes = np.clip(np.round(blocks / s[:, None]) + zero[:, None], 0, 2**fmt.bits - 1)
        return QuantizedCodes(codes.reshape(k, n).astype(np.uint8), scale, zero.astype(np.uint8), fmt, g)
    absmax = np.abs(blocks).max(axis=1)
    scale = _round_up(np.where(absmax > 0, absmax / symmetric_range(fmt), 1.0), SCALE_DTYPES[scale_dtype])
    codes = fmt.encode(blocks / scale.astype(np.float64)[:, None])
    return QuantizedCodes(codes.reshape(k, n), scale, None, fmt, g)


def dequantize_codes(q: QuantizedCodes) -> np.ndarray:
    """float64 values of quantized codes."""
    k, n = q.codes.shape
    s = np.asarray(q.scales, np.float64)[:, None]
    blocks = q.codes.reshape(k // q.group, q.group, n)
    if q.zeros is not None:
        values = (blocks.astype(np.float64) - q.zeros.astype(np.float64)[:, None]) * s
    else:
        values = q.fmt.decode(blocks) * s
    return values.reshape(k, n)
