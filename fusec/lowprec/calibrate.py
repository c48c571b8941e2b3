"""Calibrated quantization: ``calibrate(apply_fn, params, batches, bits=4)`` runs the model on
calibration batches, collects each matmul weight's input statistics (:mod:`hessian`), and quantizes
it with GPTQ error feedback and Hessian-weighted scale search (:mod:`gptq`), or, given a
``budget`` in average bits per weight (scales and zero-points counted), picks each matrix's width
from its measured sensitivity. The result has the same ``QuantizedArray`` leaves as
``lowprec.quantize``, so fused kernels and the reference decoder read it unchanged.

What is quantized: every float leaf of 2+ dimensions that a ``dot_general`` reads directly (through
transposes and dtype conversions) along one set of axes; embedding tables read by ``gather`` stay
float. The budget averages over exactly those matrices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TextIO

import jax
import numpy as np

from fusec.lowprec.codebook import learn_table
from fusec.lowprec.formats import Format
from fusec.lowprec.forward import Forward
from fusec.lowprec.gptq import Factor, factor, gptq, output_energy, output_error, rtn
from fusec.lowprec.hessian import Hessian, HessianCollector
from fusec.lowprec.progress import Progress
from fusec.lowprec.qarray import QuantSpec, from_codes, packed_shape
from fusec.lowprec.quantize import SCALE_DTYPES, QuantizedCodes, dequantize_codes
from fusec.lowprec.refit import refit_scales

METHODS = ("gptq", "rtn")
WIDTHS = (2, 3, 4, 5, 6, 7, 8)


@dataclass(frozen=True)
class MatrixResult:
    """One calibrated matrix: how it was quantized and what that costs in size and output error
    (tr(D^T H D) / tr(W^T H W) on the calibration inputs, D the weight's change)."""

    path: str
    method: str
    format: str  # e.g. "int4g128"
    bits: int
    weights: int
    bits_per_weight: float  # codes, scales and zero-points, as stored
    output_error: float
    rtn_error: float  # the same width by plain round-to-nearest, for comparison


@dataclass(frozen=True)
class CalibrationReport:
    matrices: tuple[MatrixResult, ...]
    left_float: tuple[tuple[str, str], ...]  # (path, why) for float matrices not quantized
    batches: int

    @property
    def bits_per_weight(self) -> float:
        """The average over the quantized matrices, scales, zero-points and learned tables counted."""
        total = sum(m.weights for m in self.matrices)
        return sum(m.bits_per_weight * m.weights for m in self.matrices) / max(total, 1)

    @property
    def mean_output_error(self) -> float:
        return float(np.mean([m.output_error for m in self.matrices])) if self.matrices else 0.0

    def __str__(self) -> str:
        lines = [f"{'matrix':40s} {'method':12s} {'format':10s} {'bpw':>6s} {'out err':>9s} {'rtn err':>9s}"]
        lines += [f"{m.path:40s} {m.method:12s} {m.format:10s} {m.bits_per_weight:6.3f} {m.output_error:9.2e} "
                  f"{m.rtn_error:9.2e}" for m in self.matrices]
        lines.append(f"{len(self.matrices)} matrices, {sum(m.weights for m in self.matrices)} weights, "
                     f"{self.bits_per_weight:.3f} bits per weight (scales, zero-points and learned tables counted), "
                     f"mean output error {self.mean_output_error:.2e} "
                     f"(RTN {np.mean([m.rtn_error for m in self.matrices]):.2e}), "
                     f"{self.batches} calibration batches")
        lines += [f"left float: {path}: {why}" for path, why in self.left_float]
        return "\n".join(lines)


def storage_bits(k: int, n: int, bits: int, group: int, family: str, scale_dtype: str) -> int:
    """Bits a [K, N] ``QuantizedArray`` stores: codes (K padded to 32), scales, zero-points, and for
    a learned ``lut`` its 2^bits float32 table (the kernels' decode table; NormalFloat's is fixed)."""
    padded = -(-k // 32) * 32
    scale_bits = 8 * np.dtype(SCALE_DTYPES[scale_dtype]).itemsize
    table = 2**bits * 32 if family == "lut" else 0
    return padded * n * bits + (k // group) * n * (scale_bits + (8 if family == "uint" else 0)) + table


def _check_args(bits: int | None, budget: float | None, group: Any, fmt: str, method: str,
                scale_dtype: str, widths: tuple[int, ...]) -> None:
    if isinstance(bits, bool) or isinstance(budget, bool):
        raise ValueError(f"bits and budget are numbers of bits, got bits={bits!r}, budget={budget!r}")
    if (bits is None) == (budget is None):
        raise ValueError("calibrate needs exactly one of bits= (one width for every matrix) or budget= "
                         f"(average bits per weight); got bits={bits!r}, budget={budget!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {scale_dtype!r}")
    groups = group if isinstance(group, tuple) and budget is not None else (group,)
    if not groups or any(g is not None and (not isinstance(g, int) or g <= 0) for g in groups):
        raise ValueError("group must be a positive int or None (one scale per column), or with a budget a "
                         f"tuple of them to choose from, got {group!r}")
    if bits is not None:
        # raises naming the bad width or format; a lut's table is learned, so any stands in for it
        QuantSpec(bits, group, fmt, lut=(0.0,) * 2**bits if fmt == "lut" and bits in range(1, 9) else None).format()
        return
    if not isinstance(budget, (int, float)) or not 1 <= budget <= 8:
        raise ValueError(f"budget must be an average of 1 to 8 bits per weight, got {budget!r}")
    if fmt not in ("int", "uint", "nf", "lut"):
        raise ValueError(f"a bit budget varies widths, which format {fmt!r} cannot; use int, uint, nf or lut")
    if not widths or any(not isinstance(b, int) or not 1 <= b <= 8 for b in widths):
        raise ValueError(f"widths must be bit widths in 1..8, got {widths!r}")
    if fmt == "nf" and min(widths) < 2:
        raise ValueError("NormalFloat needs at least 2 bits; drop width 1 from widths")


def _matrix(leaf: Any, contract: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(leaf, np.float64)
    k, n = packed_shape(arr.shape, contract)
    return arr.T if contract == (1,) else arr.reshape(k, n)


def _quantize(w: np.ndarray, h: np.ndarray, fmt: Format, group: int, scale_dtype: str, method: str,
              search: bool, act_order: bool, damp: float, block: int, refit: bool,
              factored: Factor | None = None) -> QuantizedCodes:
    if method == "rtn":
        return rtn(w, h, fmt, group, scale_dtype, search=search)
    q = gptq(w, h, fmt, group, scale_dtype, damp=damp, block=block, act_order=act_order, search=search,
             factored=factored)
    return refit_scales(w, h, q, scale_dtype) if refit else q


def _allocate(costs: list[list[int]], errors: list[list[float]], limit: float) -> list[int] | None:
    """Per matrix, an index into its widths so the summed cost stays <= limit, greedily buying the
    largest error drop per bit; None if even the narrowest widths exceed the limit."""
    choice = [int(np.argmin(c)) for c in costs]
    total = sum(c[i] for c, i in zip(costs, choice))
    if total > limit:
        return None
    while True:  # any dearer option may be the next step: error need not fall evenly with cost
        best, best_gain = (-1, -1), 0.0
        for m, i in enumerate(choice):
            for j, cost in enumerate(costs[m]):
                extra = cost - costs[m][i]
                if extra > 0 and total + extra <= limit:
                    gain = (errors[m][i] - errors[m][j]) / extra
                    if gain > best_gain:
                        best, best_gain = (m, j), gain
        m, j = best
        if m < 0:
            return choice
        total += costs[m][j] - costs[m][choice[m]]
        choice[m] = j


def _factor(h: np.ndarray, method: str, damp: float, act_order: bool) -> Factor | None:
    return factor(h, damp, act_order) if method == "gptq" else None


def _method_name(method: str, search: bool, act_order: bool, sequential: bool, refit: bool) -> str:
    gptq = method == "gptq"
    return (method + ("+search" if search else "") + ("+act" if act_order and gptq else "")
            + ("+refit" if refit and gptq else "") + ("+seq" if sequential else ""))


def _one(w: np.ndarray, h: np.ndarray, bits: int, group: int | None, fmt: str, scale_dtype: str, method: str,
         search: bool, act_order: bool, damp: float, block: int, refit: bool, factored: Factor | None = None,
         energy: float | None = None) -> tuple[QuantizedCodes, float, int]:
    """One matrix at one width: its codes, relative output error and stored bits (``factored``
    and ``energy``: H's GPTQ factor and tr(W^T H W), shared by every width of the matrix)."""
    g = w.shape[0] if group is None else group
    spec = learn_table(w, np.diag(h), bits, g) if fmt == "lut" else QuantSpec(bits, group, fmt).format()
    q = _quantize(w, h, spec, g, scale_dtype, method, search, act_order, damp, block, refit, factored)
    return q, output_error(w, dequantize_codes(q), h, energy), storage_bits(*w.shape, bits, g, fmt, scale_dtype)


def _with_values(leaves: list[Any], index: int, contract: tuple[int, ...], q: QuantizedCodes) -> list[Any]:
    """``leaves`` with leaf ``index`` replaced by the float values of its codes."""
    leaf = leaves[index]
    values = dequantize_codes(q)
    out = list(leaves)
    out[index] = jax.numpy.asarray(values.T if contract == (1,) else values.reshape(np.shape(leaf)), leaf.dtype)
    return out


def _model_gains(forward: Forward, params: Any, where: list[tuple[int, tuple[int, ...]]],
                 probes: list[tuple[QuantizedCodes, float, int]], prog: Progress, names: list[str]) -> list[float]:
    """Per matrix, the squared error of the model's outputs on the batches with only that matrix
    quantized (its ``probes`` codes), per unit of its own relative output error: how much its error
    matters downstream, so widths go where the model's output gains most."""
    leaves, treedef = jax.tree.flatten(params)
    gains = []
    for _, (index, contract), (q, rel, _) in prog.phase("model effect", list(zip(names, where, probes)),
                                                       label=lambda item: item[0]):
        probe = jax.tree.unflatten(treedef, _with_values(leaves, index, contract, q))
        err = sum(float(np.sum((o - r) ** 2)) for i in range(len(forward.batches))
                  for o, r in zip(forward.outputs(probe, i), forward.reference(i)))
        gains.append(err / max(rel, 1e-30))
    return gains


def _size(item: tuple[str, Hessian, np.ndarray]) -> float:
    return float(item[2].size)  # a matrix's share of the work: its weights


def _name(item: tuple[str, Hessian, np.ndarray]) -> str:
    return item[0]


def calibrate(apply_fn: Callable[..., Any], params: Any, batches: Iterable[Any], *, bits: int | None = None,
              budget: float | None = None, group: int | None | tuple[int | None, ...] = 128, fmt: str = "int",
              scale_dtype: str = "bf16",
              method: str = "gptq", search: bool = True, act_order: bool = True, damp: float = 0.1,
              block: int = 128, refit: bool = False, widths: tuple[int, ...] = WIDTHS,
              where: Callable[[str, Any], bool] | None = None, sequential: bool = False,
              progress: bool | TextIO = False,
              with_report: bool = False) -> Any:
    """``params`` with every matmul weight quantized against ``apply_fn(params, *batch)`` on
    ``batches`` (tuples of the arguments after ``params``; a non-tuple is the one argument).

    ``bits``: one width for every matrix; or ``budget``: an average bits per weight, scales and
    zero-points counted, met by choosing each matrix's width in ``widths`` (GPTQ at every width)
    for the least model output error: each matrix's own output error per width, times how much the
    model's outputs on the batches move with that matrix alone quantized. ``group``: rows per scale
    along the contracted axis (None: one per column; with a budget, a tuple of sizes to choose
    from per matrix as well); ``fmt`` int | uint | nf | lut (a table
    learned per matrix, see :mod:`codebook`), or fp with ``bits``; ``method`` "gptq" (error
    feedback) or "rtn"; ``search``: Hessian-weighted clipping search for each group's scale;
    ``act_order`` (default on): GPTQ in decreasing input-energy order (undone offline); ``damp``
    (default 0.1): added to H's diagonal, as a fraction of its mean; calibration sets smaller than
    a matrix's K leave H rank-deficient, and GPTQ then fits noise (on MiniLM nf4, 0.01 gave cosine
    0.9843, 0.1 0.9867, 0.1 with act-order 0.9873); ``refit`` (GPTQ only): each group's scale
    refitted by least squares given its codes (:mod:`refit`; on MiniLM +0.0001 at nf4, +0.0008 at
    nf3); ``sequential``: each matrix's inputs are collected with the matrices before it already quantized (as GPTQ does
    layer by layer). ``where(path, leaf)`` narrows the matrices. ``progress``: a progress bar on
    stderr (or on the stream given): phase, matrix i/N, elapsed time, ETA (:mod:`progress`).
    With ``with_report`` returns ``(qparams, CalibrationReport)``. Every argument, batch and
    matrix is checked before any weight is quantized; errors raise ``ValueError``.
    """
    _check_args(bits, budget, group, fmt, method, scale_dtype, tuple(widths))
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise ValueError(f"batches must be an iterable of calibration batches (tuples of the arguments after "
                         f"params), got {type(batches).__name__}")
    prog = Progress(progress)
    batch_list = list(batches)
    collector = HessianCollector(apply_fn, params, batch_list, where)
    bad = [p for p, h in collector.hessians.items() if not np.all(np.isfinite(h.h))]
    if bad:
        raise ValueError(f"the calibration batches give {bad} non-finite inputs (inf or NaN in X^T X); "
                         "check the batches and the model's float range")
    prog.note(f"statistics: X^T X of {len(collector.hessians)} matrices from {len(batch_list)} batches")
    skipped = dict(collector.skipped)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    by_path = {jax.tree_util.keystr(p) or "<root>": i for i, (p, _) in enumerate(leaves)}
    chosen: list[tuple[str, Hessian, np.ndarray]] = []
    groups = group if isinstance(group, tuple) else (group,)
    fits: dict[str, list[int | None]] = {}
    for path, hess in collector.hessians.items():
        w = _matrix(leaves[by_path[path]][1], hess.contract)
        fit = [g for g in groups if g is None or w.shape[0] % g == 0]
        if not fit:
            skipped[path] = (f"its contracted size {w.shape[0]} is not a whole number of "
                             f"{' or '.join(map(str, groups))}-row groups")
            continue
        fits[path] = fit
        chosen.append((path, hess, w))
    left = tuple(sorted(skipped.items()))
    if not chosen:
        why = "; ".join(f"{p}: {r}" for p, r in left) or "params has no float matrix"
        raise ValueError(f"calibrate found no matrix to quantize (bits={bits}, budget={budget}, group={group}, "
                         f"where={'given' if where else 'None'}): {why}")
    if where is not None:
        unread = [p for p, r in left if r == "no matmul reads it"]
        if unread:
            raise ValueError(f"where selects {unread}, but no matmul reads them, so there is nothing to "
                             "calibrate them on; leave them out or use lowprec.quantize")
    args = (scale_dtype, method, search, act_order, damp, block, refit)
    picks = {path: (bits, group) for path, _, _ in chosen}
    first: dict[str, tuple[QuantizedCodes, float, int]] = {}
    if budget is not None:  # every width on the float model's inputs: each matrix's sensitivity
        options = {p: [(b, g) for b in sorted(set(widths)) for g in fits[p]] for p, _, _ in chosen}
        forward = Forward(apply_fn, params, batch_list)  # compiles in the background meanwhile
        results = []
        for path, hess, w in prog.phase("sensitivity", chosen, size=_size, label=_name):
            f, e = _factor(hess.h, method, damp, act_order), output_energy(w, hess.h)  # once for all widths
            results.append([_one(w, hess.h, b, g, fmt, *args, factored=f, energy=e) for b, g in options[path]])
        total_weights = sum(w.size for _, _, w in chosen)
        # Each matrix's effect on the model is probed at the option nearest the budget.
        probes = [r[min(range(len(r)), key=lambda i: abs(r[i][2] / w.size - budget))]
                  for r, (_, _, w) in zip(results, chosen)]
        gains = _model_gains(forward, params, [(by_path[p], hess.contract) for p, hess, _ in chosen], probes, prog,
                             [p for p, _, _ in chosen])
        picked = _allocate([[c for _, _, c in r] for r in results],
                           [[gain * e for _, e, _ in r] for gain, r in zip(gains, results)], budget * total_weights)
        if picked is None:
            least = sum(min(c for _, _, c in r) for r in results) / total_weights
            raise ValueError(f"budget {budget} bits per weight is below the least these matrices can be stored in "
                             f"({least:.3f} at {min(widths)} bits with group {group} {scale_dtype} scales)")
        picks = {path: options[path][i] for (path, _, _), i in zip(chosen, picked)}
        first = {path: r[i] for (path, _, _), r, i in zip(chosen, results, picked)}
    out = [leaf for _, leaf in leaves]
    current = list(out)  # the model as later stages see it: earlier stages' weights dequantized
    final: dict[str, tuple[QuantizedCodes, float, int, np.ndarray]] = {}
    hs, stage_now = collector.hessians, None
    ordered = sorted(chosen, key=lambda c: collector.stages.get(c[0], 0))  # stable: chosen order within a stage
    for path, hess, w in prog.phase("quantize", ordered, size=_size, label=_name):
        stage = collector.stages.get(path, 0)
        if sequential and stage_now is not None and stage != stage_now:
            hs = collector.collect(jax.tree_util.tree_unflatten(treedef, current))
        stage_now = stage
        h = hs[path].h
        q, err, cost = first[path] if path in first and h is hess.h else _one(w, h, *picks[path], fmt, *args)
        final[path] = (q, err, cost, h)
        current = _with_values(current, by_path[path], hess.contract, q)
    report_rows = []
    for path, hess, w in chosen:
        q, err, cost, h = final[path]
        leaf = leaves[by_path[path]][1]
        out[by_path[path]] = from_codes(q, np.shape(leaf), leaf.dtype, hess.contract)
        rtn_q = rtn(w, h, q.fmt, q.group, scale_dtype)
        name = f"{q.fmt.family}{q.fmt.bits}g{q.group}"
        report_rows.append(MatrixResult(path, _method_name(method, search, act_order, sequential, refit), name,
                                        q.fmt.bits, w.size, cost / w.size, err,
                                        output_error(w, dequantize_codes(rtn_q), h)))
    qparams = jax.tree_util.tree_unflatten(treedef, out)
    if with_report:
        return qparams, CalibrationReport(tuple(report_rows), left, len(batch_list))
    return qparams
