"""GPTQ (Frantar et al. 2022) and Hessian-weighted scale search, in NumPy float64.

A weight W [K, N] (K the contracted axis, as ``QuantizedArray`` packs it) with input statistics
H = X^T X [K, K] is quantized one row k at a time; each row's rounding error is spread over the
rows not yet quantized through the Cholesky factor of H^-1, so the layer's output X W moves as
little as possible. Damping (a fraction of H's mean diagonal, 0.1 by default), lazy blocked updates, and optional
act-order (rows in decreasing H_kk; group scales are then fixed up front from the original
weight, and the codes are put back in natural row order, so the stored weight needs no
permutation). Scales are chosen per group and column by a grid search over clipping ratios that
minimises the H_kk-weighted rounding error (the output error of the group alone), and rounded to
the scale dtype before any code is chosen, so the codes returned decode exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusec.lowprec.formats import Format
from fusec.lowprec.nearest import nearest_scaled
from fusec.lowprec.quantize import SCALE_DTYPES, QuantizedCodes, _round_up, quantize_codes, symmetric_range

CLIP_GRID = tuple(np.round(np.linspace(1.0, 0.5, 21), 4))


def quantize_rows(w: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, fmt: Format, codes: bool = True
                  ) -> tuple[np.ndarray | None, np.ndarray]:
    """Codes (None unless ``codes``) and their float64 values for rows ``w`` [..., N] sharing
    per-column ``scale`` [N]: exactly ``fmt.encode(w / scale)`` and ``fmt.table[codes] * scale``."""
    if zero is not None:
        c = np.clip(np.rint(w / scale) + zero, 0, 2**fmt.bits - 1)
        return c.astype(np.uint8), (c - zero) * scale
    if fmt.family == "int":  # fast path: rint is half-to-even, as encode's ties are
        lo, hi = -(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1
        c = np.mod(np.clip(np.rint(w / scale), lo, hi), 2**fmt.bits).astype(np.uint8)
        return c, fmt.table[c] * scale
    return nearest_scaled(w, scale, fmt, codes)


class _Ranges:
    """What every clipping ratio's scale is computed from, computed once per group: the columns'
    largest magnitude, or for uint their ranges around 0."""

    def __init__(self, g: np.ndarray, fmt: Format) -> None:
        self.fmt = fmt
        if fmt.family == "uint":
            self.lo, self.hi = np.minimum(g.min(axis=0), 0.0), np.maximum(g.max(axis=0), 0.0)
        else:
            self.absmax, self.range = np.abs(g).max(axis=0), symmetric_range(fmt)

    def scales(self, ratio: float, dtype: type) -> tuple[np.ndarray, np.ndarray | None]:
        fmt = self.fmt
        if fmt.family == "uint":
            lo, hi = self.lo * ratio, self.hi * ratio
            s = _round_up(np.where(hi > lo, (hi - lo) / (2**fmt.bits - 1), 1.0), dtype).astype(np.float64)
            return s, np.clip(np.rint(-lo / s), 0, 2**fmt.bits - 1)
        absmax = self.absmax * ratio
        s = _round_up(np.where(absmax > 0, absmax / self.range, 1.0), dtype).astype(np.float64)
        return s, None


def search_scales(g: np.ndarray, weights: np.ndarray, fmt: Format, scale_dtype: str,
                  grid: tuple[float, ...] = CLIP_GRID) -> tuple[np.ndarray, np.ndarray | None]:
    """Per column of a group ``g`` [G, N]: the scale (and zero-point for uint), among clipping
    ratios ``grid``, with the least sum_k weights_k (g_kn - q_kn)^2."""
    dtype = SCALE_DTYPES[scale_dtype]
    ranges = _Ranges(g, fmt)
    best_s, best_z = ranges.scales(grid[0], dtype)
    best_err = np.full(g.shape[1], np.inf)
    for ratio in grid:
        s, z = ranges.scales(ratio, dtype)
        _, q = quantize_rows(g, s, z, fmt, codes=False)
        d = np.subtract(g, q, out=q)
        err = weights @ np.square(d, out=d)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        if z is not None and best_z is not None:
            best_z = np.where(better, z, best_z)
    return best_s, best_z


def _finish(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, fmt: Format, group: int,
            scale_dtype: str) -> QuantizedCodes:
    s = scales.astype(SCALE_DTYPES[scale_dtype])
    assert np.array_equal(s.astype(np.float64), scales), "scales must already be in their dtype"
    return QuantizedCodes(codes, s, None if zeros is None else zeros.astype(np.uint8), fmt, group)


def rtn(w: np.ndarray, h: np.ndarray, fmt: Format, group: int, scale_dtype: str = "bf16",
        search: bool = False) -> QuantizedCodes:
    """Round to nearest; with ``search``, each group's scale from :func:`search_scales` weighted by
    diag(H). Without it, exactly ``quantize_codes``."""
    if not search:
        return quantize_codes(w.astype(np.float32), fmt, group, scale_dtype)
    k, n = w.shape
    d = np.diag(h).astype(np.float64) + 1e-12
    codes = np.empty((k, n), np.uint8)
    scales, zeros = np.empty((k // group, n)), (np.empty((k // group, n)) if fmt.family == "uint" else None)
    for j in range(k // group):
        rows = slice(j * group, (j + 1) * group)
        s, z = search_scales(w[rows], d[rows], fmt, scale_dtype)
        codes[rows], _ = quantize_rows(w[rows], s, z, fmt)
        scales[j] = s
        if zeros is not None and z is not None:
            zeros[j] = z
    return _finish(codes, scales, zeros, fmt, group, scale_dtype)


@dataclass(frozen=True)
class Factor:
    """What GPTQ needs of H, whatever the width or group: the damped diagonal, the row order, and
    the upper Cholesky factor U of the (permuted) damped H^-1 = U^T U. Computed once per matrix."""

    weights: np.ndarray
    perm: np.ndarray
    u: np.ndarray


def factor(h: np.ndarray, damp: float = 0.1, act_order: bool = False) -> Factor:
    h = np.asarray(h, np.float64)
    k = h.shape[0]
    diag = np.diag(h)
    h = h + np.eye(k) * damp * max(float(np.mean(diag)), 1e-12)
    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(k)
    u = np.linalg.cholesky(np.linalg.inv(h[np.ix_(perm, perm)])).T  # upper: H^-1 = U^T U
    return Factor(np.diag(h), perm, u)


def gptq(w: np.ndarray, h: np.ndarray, fmt: Format, group: int, scale_dtype: str = "bf16", *,
         damp: float = 0.1, block: int = 128, act_order: bool = False, search: bool = True,
         factored: Factor | None = None) -> QuantizedCodes:
    """GPTQ of ``w`` [K, N] given H = X^T X [K, K]; ``group`` divides K. ``factored``: ``factor(h,
    damp, act_order)`` computed beforehand (the same for every width and group)."""
    w = np.asarray(w, np.float64)
    k, n = w.shape
    f = factor(h, damp, act_order) if factored is None else factored
    weights, perm, u = f.weights, f.perm, f.u
    grid = CLIP_GRID if search else (1.0,)
    scales = np.empty((k // group, n))
    zeros = np.empty((k // group, n)) if fmt.family == "uint" else None
    if act_order:  # scales fixed first, from the original weight, in natural group order
        for j in range(k // group):
            rows = slice(j * group, (j + 1) * group)
            s, z = search_scales(w[rows], weights[rows], fmt, scale_dtype, grid)
            scales[j] = s
            if zeros is not None and z is not None:
                zeros[j] = z
    wp = w[perm].copy()
    # Blocks hold whole groups, so a group's scale is searched on rows that are all up to date.
    b = group if group >= block else group * max(1, block // group)
    codes = np.empty((k, n), np.uint8)
    for b0 in range(0, k, b):
        b1 = min(b0 + b, k)
        w1, u1 = wp[b0:b1].copy(), u[b0:b1, b0:b1]
        err = np.zeros_like(w1)
        for i in range(b1 - b0):
            row = b0 + i
            if not act_order and row % group == 0:
                s, z = search_scales(w1[i:i + group], weights[row:row + group], fmt, scale_dtype, grid)
                scales[row // group] = s
                if zeros is not None and z is not None:
                    zeros[row // group] = z
            j = perm[row] // group
            c, q = quantize_rows(w1[i], scales[j], None if zeros is None else zeros[j], fmt)
            codes[row] = c
            e = (w1[i] - q) / u1[i, i]
            w1[i + 1:] -= np.outer(u1[i, i + 1:], e)
            err[i] = e
        wp[b1:] -= u[b0:b1, b1:].T @ err
    natural = np.empty_like(codes)
    natural[perm] = codes
    return _finish(natural, scales, zeros, fmt, group, scale_dtype)


def output_energy(w: np.ndarray, h: np.ndarray) -> float:
    """tr(W^T H W): the layer's squared output on the calibration inputs."""
    w = np.asarray(w, np.float64)
    return float(np.sum(w * (h @ w)))


def output_error(w: np.ndarray, values: np.ndarray, h: np.ndarray, energy: float | None = None) -> float:
    """tr(D^T H D) / tr(W^T H W), D = W - values: the layer's relative squared output error on the
    calibration inputs (``energy``: :func:`output_energy`, when known)."""
    d = np.asarray(w, np.float64) - values
    num = float(np.sum(d * (h @ d)))
    den = output_energy(w, h) if energy is None else energy
    return num / den if den > 0 else num
