"""Learned codebooks: a per-matrix lookup table (the ``lut`` format) fitted to the weights by
Hessian-weighted 1-D k-means, starting from NormalFloat.

Each group's column is divided by its largest magnitude (the scale ``quantize_codes`` would give a
table whose symmetric range is 1), and the table's values minimise sum_k H_kk s^2 (v - c(v))^2 over
those normalised values v, the output error each weight would add alone. The end values stay at
-1 and +1, so the symmetric range, and with it every group's scale, is what the fit assumed.
"""

from __future__ import annotations

import numpy as np

from fusec.lowprec.formats import Format, normal_float_table


def learn_table(w: np.ndarray, h_diag: np.ndarray, bits: int, group: int, iterations: int = 20) -> Format:
    """A ``lut`` format of ``bits`` bits for ``w`` [K, N] (groups of ``group`` rows along K)."""
    k, n = w.shape
    blocks = np.asarray(w, np.float64).reshape(k // group, group, n)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    absmax = np.where(absmax > 0, absmax, 1.0)
    v = (blocks / absmax).ravel()
    weight = (np.asarray(h_diag, np.float64).reshape(k // group, group, 1) * absmax**2
              * np.ones_like(blocks)).ravel() + 1e-30
    table = normal_float_table(bits) if bits >= 2 else np.array([-1.0, 1.0])
    for _ in range(iterations):
        cluster = np.searchsorted((table[1:] + table[:-1]) / 2, v)
        mass = np.bincount(cluster, weight, minlength=len(table))
        total = np.bincount(cluster, weight * v, minlength=len(table))
        updated = np.where(mass > 0, total / np.where(mass > 0, mass, 1.0), table)
        updated[0], updated[-1] = -1.0, 1.0  # pinned: the scale assumes a symmetric range of 1
        updated = np.sort(updated)
        if np.allclose(updated, table, rtol=0, atol=1e-9):
            break
        table = updated
    return Format("lut", bits, lut=tuple(float(t) for t in table))
