"""Nearest codes of a format's table, bit-identical to ``Format.encode`` and several times faster.

``Format.encode`` binary-searches the sorted table for every value, then compares the distances to
the two neighbours (ties to the even code). Calibration calls it on ~10^9 values (every clipping
ratio of every group at every width), so here a uniform grid of 2^18 buckets over the table's
range holds, per bucket, the sorted position ``encode`` picks throughout it. That position never
decreases as the value grows, so a bucket whose edges, widened by a millionth of a bucket (far more
than the float64 error in computing a value's bucket), pick the same position is constant, and a
value landing in it takes that code without a search. Values in the buckets around a midpoint or
beyond the grid, and non-finite values, go through ``encode``'s exact steps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from fusec.lowprec.formats import Format

BUCKETS = 2**18  # 512 KiB of int16 per format; more buckets, fewer values near a midpoint to search


@dataclass(frozen=True)
class _Grid:
    lo: float
    inv_step: float
    position: np.ndarray  # int16 [BUCKETS]: the sorted position every value near the bucket takes, or -1
    order: np.ndarray  # the finite codes by value (uint8)
    sorted_values: np.ndarray


def _positions(sorted_values: np.ndarray, order: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The sorted-table position ``Format.encode`` picks for each of ``v`` (its exact steps)."""
    hi = np.clip(np.searchsorted(sorted_values, v), 1, len(sorted_values) - 1)
    lo = hi - 1
    pick_hi = np.abs(sorted_values[hi] - v) < np.abs(v - sorted_values[lo])
    ties = np.abs(sorted_values[hi] - v) == np.abs(v - sorted_values[lo])
    pick_hi = np.where(ties, order[hi] % 2 == 0, pick_hi)
    return np.where(pick_hi, hi, lo)


@functools.lru_cache(maxsize=32)  # learned tables are one format per matrix and width: keep a few
def _grid(fmt: Format) -> _Grid | None:
    table = fmt.table
    order = np.argsort(np.where(np.isfinite(table), table, np.inf), kind="stable")
    order = order[np.isfinite(table[order])]
    sorted_values = table[order]
    span = sorted_values[-1] - sorted_values[0] if len(sorted_values) else 0.0
    if not span > 0:
        return None
    lo = sorted_values[0] - 2 * span  # values beyond clamp into an end bucket, which is never safe
    step = 5 * span / BUCKETS
    # Bucket b is [edges[b], edges[b+1]); a value's bucket, computed in float64, is off by far less
    # than a millionth of a bucket, so b is safe when a millionth of a bucket beyond either edge
    # picks the same position. The end buckets also hold every value beyond the grid (where
    # encode's distance ties need not pick the nearest end): never safe.
    margin = step * 1e-6
    starts = _positions(sorted_values, order, lo + np.arange(BUCKETS) * step - margin)
    ends = _positions(sorted_values, order, lo + np.arange(1, BUCKETS + 1) * step + margin)
    position = np.where(starts == ends, starts, -1).astype(np.int16)
    position[0] = position[-1] = -1
    return _Grid(float(lo), float(1 / step), position, order.astype(np.uint8), sorted_values)


def nearest(x: np.ndarray, fmt: Format) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8, their float64 table values) of the nearest table values to ``x``, exactly as
    ``fmt.encode(x)`` and ``fmt.table[codes]``."""
    grid = _grid(fmt)
    x = np.asarray(x, np.float64)
    if grid is None:
        codes = fmt.encode(x)
        return codes, fmt.table[codes]
    t = x - grid.lo
    t *= grid.inv_step
    # fmax/fmin send NaN to bucket 0 and infinities to the ends, all unsafe: the exact path
    np.fmin(np.fmax(t, 0.0, out=t), BUCKETS - 1, out=t)
    pos = grid.position[t.astype(np.intp)]
    exact = pos < 0
    if exact.any():
        pos[exact] = _positions(grid.sorted_values, grid.order, x[exact])
    return grid.order[pos], grid.sorted_values[pos]


def nearest_scaled(w: np.ndarray, scale: np.ndarray, fmt: Format, codes: bool = True
                   ) -> tuple[np.ndarray | None, np.ndarray]:
    """``nearest(w / scale, fmt)`` with the values times ``scale`` (broadcast against ``w``), codes
    only if asked: the buckets come from w * (1 / (step * scale)), a few roundings off w / scale
    but far within the one-bucket margin, so w / scale is only divided out where it is searched."""
    grid = _grid(fmt)
    if grid is None:
        c, v = nearest(w / scale, fmt)
        return c, v * scale
    t = w * (grid.inv_step / scale)
    t -= grid.lo * grid.inv_step
    np.fmin(np.fmax(t, 0.0, out=t), BUCKETS - 1, out=t)
    pos = grid.position[t.astype(np.intp)]
    exact = pos < 0
    if exact.any():
        s = scale if np.shape(scale) == w.shape else np.broadcast_to(scale, w.shape)
        pos[exact] = _positions(grid.sorted_values, grid.order, w[exact] / s[exact])
    values = grid.sorted_values[pos]
    values *= scale
    return (grid.order[pos] if codes else None), values
