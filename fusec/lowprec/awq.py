"""Choosing each matrix's input transform for ``calibrate(rotate=..., awq=...)`` (see :mod:`rotate`).

``rotate="hadamard"``: T = diag(signs_K) . B(block) (fixed random signs, stored as nothing), so
outliers of W's rows spread over each block before quantization. ``awq=True``: activation-aware
scaling, T = diag(1 / s) . diag(signs_K) . B with s = rms(x)^alpha per input channel (rms from
diag(H), the calibration inputs' second moments; s normalised to geometric mean 1), so salient
input channels get more of the grid; alpha in ``ALPHAS`` is chosen by the least H-weighted output
error tr(D^T H' D) of round-to-nearest at the target width (AWQ's own search, fast; GPTQ then runs
at the chosen alpha). Matrices reading the same inputs (Q/K/V) share one T, as AWQ shares its
scales, so a fused program computes x T once and sibling matmuls still share one kernel. The scale
is stored in the matrix's scale dtype, and T^-1 W and T^T H T are computed from the stored
(rounded) values, so T . deq(Q) is exactly what GPTQ compensated for.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

import numpy as np

from fusec.lowprec.formats import Format
from fusec.lowprec.gptq import output_error
from fusec.lowprec.qarray import QuantSpec
from fusec.lowprec.quantize import SCALE_DTYPES, dequantize_codes, quantize_codes
from fusec.lowprec.rotate import InputTransform, check_block

ALPHAS = tuple(round(a, 2) for a in np.linspace(0.0, 1.0, 11))
ROTATIONS = (None, "hadamard")


def check_transform_args(rotate: str | None, rotate_block: int, awq: bool) -> None:
    if rotate not in ROTATIONS:
        raise ValueError(f"rotate must be one of {ROTATIONS}, got {rotate!r}")
    if rotate is not None and (not isinstance(rotate_block, int) or rotate_block < 1
                               or rotate_block & (rotate_block - 1)):
        raise ValueError(f"rotate_block must be a power of two, got {rotate_block!r}")
    if not isinstance(awq, bool):
        raise ValueError(f"awq must be True or False, got {awq!r}")


def _search_format(fmt: str, bits: int) -> Format:
    # A learned table is fitted later; NormalFloat stands in for it while alpha is chosen.
    return QuantSpec(bits, None, "nf" if fmt == "lut" else fmt).format()


def _rtn_error(w: np.ndarray, h: np.ndarray, t: InputTransform, fmt: Format, group: int, scale_dtype: str) -> float:
    inner, ht = t.inverse(w), t.hessian(h)
    q = quantize_codes(inner.astype(np.float32), fmt, group, scale_dtype)
    return output_error(inner, dequantize_codes(q), ht)


def choose_transform(paths: list[str], ws: list[np.ndarray], h: np.ndarray, *, rotate: str | None,
                     rotate_block: int, awq: bool, fmt: str, bits: int, groups: list[int], scale_dtype: str
                     ) -> tuple[InputTransform, str]:
    """One transform for the matrices ``ws`` [K, N_i] that read the same inputs (Hessian ``h``:
    Q/K/V, gate/up), so fused programs compute x T once and sibling matmuls still share it; and its
    name for the report ("+rot128", "+awq0.4"). AWQ's alpha minimises the sum of their errors."""
    block = rotate_block if rotate is not None else 0
    dtype = SCALE_DTYPES[scale_dtype]  # in_scale is stored like the group scales
    name = f"+rot{block}" if block else ""
    if not awq:
        return InputTransform(block), name
    rms = np.sqrt(np.maximum(np.diag(h), 0.0))
    rms = np.maximum(rms, max(float(rms.max()), 1e-30) * 1e-4)  # dead channels: no huge scales
    search = _search_format(fmt, bits)
    best: tuple[float, InputTransform, float] | None = None
    for alpha in ALPHAS:
        s = rms**alpha
        s = s / np.exp(np.mean(np.log(s)))
        t = InputTransform(block, (1.0 / s).astype(dtype) if alpha else None)
        err = sum(_rtn_error(w, h, t, search, g, scale_dtype) for w, g in zip(ws, groups))
        if best is None or err < best[0]:
            best = (err, t, alpha)
    assert best is not None
    _, t, alpha = best
    return t, name + f"+awq{alpha:g}"


def transform_inputs(chosen: list[tuple[str, Any, np.ndarray]], leaves_shape: dict[str, tuple[int, ...]], *,
                     rotate: str | None, rotate_block: int, awq: bool, fmt: str, bits: int, group: Any,
                     scale_dtype: str) -> tuple[list[tuple[str, Any, np.ndarray]], dict[str, InputTransform],
                                                dict[str, str]]:
    """``chosen`` (path, Hessian, W) with W -> T^-1 W and H -> T^T H T for every matrix, the
    transforms by path and their report names. Matrices whose inputs are the same (equal Hessians)
    share one transform. Weights of more than 2 dimensions keep none. Every matrix is checked
    before any is transformed."""
    for path, _, w in chosen:
        if len(leaves_shape[path]) == 2:
            check_block(w.shape[0], rotate_block if rotate is not None else 0, path)
    siblings: dict[bytes, list[int]] = {}
    for i, (path, hess, w) in enumerate(chosen):
        if len(leaves_shape[path]) == 2:
            key = hashlib.sha1(np.ascontiguousarray(hess.h).tobytes()).digest() + str(w.shape[0]).encode()
            siblings.setdefault(key, []).append(i)
    transforms, names = {}, {}
    for members in siblings.values():
        ws = [chosen[i][2] for i in members]
        first = group[0] if isinstance(group, tuple) else group
        groups = [w.shape[0] if first is None or w.shape[0] % first else first for w in ws]
        t, name = choose_transform([chosen[i][0] for i in members], ws, chosen[members[0]][1].h, rotate=rotate,
                                   rotate_block=rotate_block, awq=awq, fmt=fmt, bits=bits, groups=groups,
                                   scale_dtype=scale_dtype)
        for i in members:
            transforms[chosen[i][0]], names[chosen[i][0]] = t, name
    out = [(p, replace(hess, h=transforms[p].hessian(hess.h)), transforms[p].inverse(w)) if p in transforms
           else (p, hess, w) for p, hess, w in chosen]
    return out, transforms, names
