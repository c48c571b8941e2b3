"""A final least-squares refit of each group's scale given its codes, Hessian-weighted.

After GPTQ the codes are fixed; the stored weight is Q = sum_j s_j * C_j per column (C_j the
decoded code values of group j, zero outside its rows). The scales minimising the layer's output
error tr((W - Q)^T H (W - Q)) solve, per column, the small G x G system (A^T H A) s = A^T H w with
A = [C_1 .. C_G]. Scales are then rounded to their dtype and kept only for the columns whose
error does not grow, so the refit never makes a matrix worse.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fusec.lowprec.quantize import SCALE_DTYPES, QuantizedCodes


def _unit_values(q: QuantizedCodes) -> np.ndarray:
    """The codes' values with every scale 1, [K, N] float64."""
    k, n = q.codes.shape
    blocks = q.codes.reshape(k // q.group, q.group, n)
    if q.zeros is not None:
        return (blocks.astype(np.float64) - q.zeros.astype(np.float64)[:, None]).reshape(k, n)
    return np.asarray(q.fmt.decode(blocks), np.float64).reshape(k, n)


def _column_errors(w: np.ndarray, c: np.ndarray, s: np.ndarray, h: np.ndarray, group: int) -> np.ndarray:
    d = w - c * np.repeat(s, group, axis=0)
    return np.sum(d * (h @ d), axis=0)


def refit_scales(w: np.ndarray, h: np.ndarray, q: QuantizedCodes, scale_dtype: str) -> QuantizedCodes:
    """``q`` with each group's scale refitted to minimise the output error under ``h`` [K, K]."""
    w, h = np.asarray(w, np.float64), np.asarray(h, np.float64)
    k, n = w.shape
    g = k // q.group
    c = _unit_values(q)
    hw = h @ w
    gram = np.empty((n, g, g))  # per column, A^T H A
    for j in range(g):
        rows = slice(j * q.group, (j + 1) * q.group)
        p = h[:, rows] @ c[rows]  # H A_j, [K, N]
        gram[:, :, j] = np.sum((c * p).reshape(g, q.group, n), axis=1).T
    rhs = np.sum((c * hw).reshape(g, q.group, n), axis=1).T  # [N, G]
    # A group whose codes are all zero has no say in the output: keep its scale (ridge on the diagonal).
    ridge = 1e-12 * np.maximum(np.trace(gram, axis1=1, axis2=2) / g, 1e-30)
    fitted = np.linalg.solve(gram + ridge[:, None, None] * np.eye(g), rhs[..., None])[..., 0].T  # [G, N]
    old = np.asarray(q.scales, np.float64)
    dtype = SCALE_DTYPES[scale_dtype]
    new = np.where(np.isfinite(fitted) & (fitted > 0), fitted, old).astype(dtype).astype(np.float64)
    better = _column_errors(w, c, new, h, q.group) < _column_errors(w, c, old, h, q.group)
    return replace(q, scales=np.where(better, new, old).astype(dtype))
