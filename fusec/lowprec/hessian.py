"""Input statistics for calibration: the Hessian proxy H = X^T X of every weight a matmul reads.

``apply_fn(params, *batch)`` is traced to a jaxpr and re-evaluated by a small interpreter that
inlines nested calls (``jit``/``pjit``, ``closed_call``, ``custom_jvp_call``, ``custom_vjp_call``,
remat) and follows each params leaf through transposes and dtype conversions. At every
``dot_general`` with such a leaf as one operand, the other operand is flattened to rows [M, K],
K ordered as the weight's packed [K, N] layout (``QuantizedArray.packed_shape``), and X^T X is
added up. The interpreter itself runs under ``jax.jit``, so one compile serves every batch of a
shape. Model code is never edited. Weights read inside ``scan``/``while``/``cond`` bodies are not
seen (they stay float).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_CALLS = {"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "custom_vjp_call_jaxpr", "remat", "checkpoint", "remat2"}
_SUB_KEYS = ("jaxpr", "call_jaxpr", "fun_jaxpr")
_PASS_THROUGH = {"convert_element_type", "copy", "copy_p", "reduce_precision"}


@dataclass(frozen=True)
class Hessian:
    """X^T X (float64 [K, K]) of one weight, the axes its matmuls contract, and the rows seen."""

    h: np.ndarray
    contract: tuple[int, ...]
    rows: int


def _sub_jaxpr(eqn: Any) -> Any | None:
    if eqn.primitive.name not in _CALLS:
        return None
    for key in _SUB_KEYS:
        sub = eqn.params.get(key)
        if sub is not None and hasattr(getattr(sub, "jaxpr", sub), "eqns"):
            return sub
    return None


class _Collector:
    """Evaluates a jaxpr on (traced) values, recording X^T X per tracked weight."""

    def __init__(self) -> None:
        self.stats: dict[tuple[str, tuple[int, ...]], list[Any]] = {}  # (path, axes) -> [X^T X, rows]
        self.contract: dict[str, set[tuple[int, ...]]] = {}
        self.unsupported: dict[str, str] = {}
        self.deps: dict[str, set[str]] = {}  # weight -> the weights upstream of its input

    def run(self, jaxpr: Any, consts: list[Any], args: list[Any],
            tracked: dict[Any, tuple[str, tuple[int, ...]]], taints: list[frozenset[str]]
            ) -> tuple[list[Any], list[frozenset[str]]]:
        """The outputs, and per output the weights upstream of it (for the order of quantization)."""
        env: dict[Any, Any] = {}
        env.update(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        taint: dict[Any, frozenset[str]] = dict(zip(jaxpr.invars, taints))
        read = lambda v: v.val if hasattr(v, "val") else env[v]  # noqa: E731 - a Literal has .val
        none: frozenset[str] = frozenset()
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            ins = [None if hasattr(v, "val") else tracked.get(v) for v in eqn.invars]
            in_taints = [none if hasattr(v, "val") else taint.get(v, none) for v in eqn.invars]
            name = eqn.primitive.name
            sub = _sub_jaxpr(eqn)
            if sub is not None:
                inner = getattr(sub, "jaxpr", sub)
                inner_consts = list(getattr(sub, "consts", []))
                inner_tracked = {iv: t for iv, t in zip(inner.invars, ins) if t is not None}
                outs, out_taints = self.run(inner, inner_consts, invals, inner_tracked, in_taints)
            else:
                union = none.union(*in_taints)
                if name == "dot_general":
                    union |= self._record(eqn, invals, ins, in_taints)
                outs = eqn.primitive.bind(*invals, **eqn.params)
                outs = outs if eqn.primitive.multiple_results else [outs]
                out_taints = [union] * len(outs)
                if ins and ins[0] is not None:
                    if name == "transpose":
                        path, perm = ins[0]
                        tracked[eqn.outvars[0]] = (path, tuple(perm[p] for p in eqn.params["permutation"]))
                    elif name in _PASS_THROUGH:
                        tracked[eqn.outvars[0]] = ins[0]
            env.update(zip(eqn.outvars, outs))
            taint.update(zip(eqn.outvars, out_taints))
        return [read(v) for v in jaxpr.outvars], [none if hasattr(v, "val") else taint.get(v, none)
                                                  for v in jaxpr.outvars]

    def _record(self, eqn: Any, invals: list[Any], ins: list[Any], taints: list[frozenset[str]]) -> frozenset[str]:
        """Adds X^T X for a weight operand; returns the weights read here."""
        (contracting, batch) = eqn.params["dimension_numbers"]
        read: set[str] = set()
        for side in (0, 1):
            info = ins[side]
            if info is None:
                continue
            path, perm = info
            read.add(path)
            self.deps.setdefault(path, set()).update(taints[1 - side] - {path})
            if batch[side]:
                self.unsupported[path] = "a batched matmul reads it"
                continue
            w_dims, x_dims = contracting[side], contracting[1 - side]
            pairs = sorted((perm[w], xd) for w, xd in zip(w_dims, x_dims))
            axes = tuple(p for p, _ in pairs)
            self.contract.setdefault(path, set()).add(axes)
            x = invals[1 - side]
            xc = [xd for _, xd in pairs]
            rest = [d for d in range(x.ndim) if d not in xc and d not in batch[1 - side]]
            rows = jnp.transpose(x, [*batch[1 - side], *rest, *xc]).astype(jnp.float32)
            k = int(np.prod([x.shape[d] for d in xc]))
            rows = rows.reshape(-1, k)
            xtx = jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST)
            entry = self.stats.setdefault((path, axes), [None, 0])
            entry[0] = xtx if entry[0] is None else entry[0] + xtx
            entry[1] += rows.shape[0]
        return frozenset(read)


def _candidates(params: Any, where: Callable[[str, Any], bool] | None) -> list[tuple[int, str]]:
    out = []
    for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0]):
        name = jax.tree_util.keystr(path) or "<root>"
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or getattr(leaf, "ndim", 0) < 2 or not jnp.issubdtype(dtype, jnp.floating):
            continue
        if where is None or where(name, leaf):
            out.append((i, name))
    return out


def _stages(deps: dict[str, set[str]]) -> dict[str, int]:
    """0 for weights whose inputs no other weight feeds, else 1 + the largest stage feeding them
    (all 0 if weights feed each other in a cycle, as a weight reused downstream may)."""
    stages: dict[str, int] = {}
    pending = dict(deps)
    while pending:
        ready = [p for p, d in pending.items() if all(q in stages or q not in deps for q in d)]
        if not ready:
            return {p: 0 for p in deps}
        for p in ready:
            stages[p] = 1 + max((stages[q] for q in pending[p] if q in stages), default=-1)
            del pending[p]
    return stages


class HessianCollector:
    """Traces ``apply_fn(params, *batch)`` once per batch shape (checking every batch), then
    :meth:`collect` gives X^T X per weight for any params of the same structure (e.g. with some
    weights already quantized, for sequential GPTQ). ``skipped``: per float matrix left out, why;
    ``stages``: the order weights can be quantized in, inputs first."""

    def __init__(self, apply_fn: Callable[..., Any], params: Any, batches: Iterable[Any],
                 where: Callable[[str, Any], bool] | None = None) -> None:
        self._candidates = _candidates(params, where)
        self._runs: list[tuple[Any, list[Any]]] = []
        self._collectors: list[_Collector] = []
        compiled: dict[Any, Any] = {}
        for index, batch in enumerate(batches):
            args = batch if isinstance(batch, tuple) else (batch,)
            key = jax.tree.structure(args), tuple((np.shape(a), str(jnp.result_type(a))) for a in jax.tree.leaves(args))
            if key not in compiled:  # a batch shaped like an earlier one traces the same
                try:
                    closed = jax.make_jaxpr(apply_fn)(params, *args)
                except Exception as e:  # the user's function: any error means this batch does not fit it
                    raise ValueError(f"calibration batch {index}: apply_fn(params, *batch) failed on it "
                                     f"({type(e).__name__}: {e})") from e
                compiled[key] = self._compile(closed)
            self._runs.append((compiled[key], jax.tree.leaves(args)))
        if not self._runs:
            raise ValueError("calibrate needs at least one calibration batch; batches was empty")
        self.hessians = self.collect(params)  # traces every shape, so the collectors are filled in
        contract: dict[str, set[tuple[int, ...]]] = {}
        deps: dict[str, set[str]] = {}
        self.skipped: dict[str, str] = {}
        for c in self._collectors:
            for path, axes in c.contract.items():
                contract.setdefault(path, set()).update(axes)
            for path, d in c.deps.items():
                deps.setdefault(path, set()).update(d)
            self.skipped.update(c.unsupported)
        for path in list(self.hessians):
            if path in self.skipped:
                del self.hessians[path]
            elif len(contract[path]) != 1:
                self.skipped[path] = f"matmuls contract it along different axes {sorted(contract[path])}"
                del self.hessians[path]
        for _, name in self._candidates:
            if name not in self.hessians and name not in self.skipped:
                self.skipped[name] = "no matmul reads it"
        self.contract = {p: next(iter(contract[p])) for p in self.hessians}
        self.hessians = {p: Hessian(h.h, self.contract[p], h.rows) for p, h in self.hessians.items()}
        self.stages = _stages({p: d & set(self.hessians) for p, d in deps.items() if p in self.hessians})

    def _compile(self, closed: Any) -> Any:
        collector = _Collector()
        self._collectors.append(collector)
        candidates = self._candidates

        def stats(flat: list[Any]) -> dict[str, Any]:
            collector.stats.clear()  # in case jit traces again
            tracked = {closed.jaxpr.invars[i]: (name, tuple(range(np.ndim(flat[i])))) for i, name in candidates}
            collector.run(closed.jaxpr, list(closed.consts), flat, tracked, [frozenset()] * len(flat))
            return {p: (s[0], s[1]) for (p, _), s in collector.stats.items()}

        return jax.jit(stats)

    def collect(self, params: Any) -> dict[str, Hessian]:
        """X^T X per weight, summed over the batches, with ``params`` (same structure) in the model."""
        sums: dict[str, list[Any]] = {}
        for fn, args in self._runs:
            for path, (xtx, rows) in fn(jax.tree.leaves(params) + args).items():
                h = np.asarray(xtx, np.float64)
                prev = sums.get(path)
                if prev is None or prev[0].shape != h.shape:  # a different shape is skipped anyway
                    sums[path] = [h, int(rows)]
                else:
                    prev[0] += h
                    prev[1] += int(rows)
        contract = getattr(self, "contract", {})
        return {p: Hessian(h, contract.get(p, ()), rows) for p, (h, rows) in sums.items()
                if not contract or p in contract}


def collect_hessians(apply_fn: Callable[..., Any], params: Any, batches: Iterable[Any],
                     where: Callable[[str, Any], bool] | None = None
                     ) -> tuple[dict[str, Hessian], dict[str, str]]:
    """X^T X per params leaf that a matmul reads, summed over ``batches`` (each a tuple of the
    arguments after ``params``; a non-tuple is one argument). Also returns, per leaf left out, why."""
    c = HessianCollector(apply_fn, params, batches, where)
    return c.hessians, c.skipped
