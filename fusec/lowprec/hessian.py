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

    def run(self, jaxpr: Any, consts: list[Any], args: list[Any],
            tracked: dict[Any, tuple[str, tuple[int, ...]]]) -> list[Any]:
        env: dict[Any, Any] = {}
        env.update(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        read = lambda v: v.val if hasattr(v, "val") else env[v]  # noqa: E731 - a Literal has .val
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            ins = [None if hasattr(v, "val") else tracked.get(v) for v in eqn.invars]
            name = eqn.primitive.name
            sub = _sub_jaxpr(eqn)
            if sub is not None:
                inner = getattr(sub, "jaxpr", sub)
                inner_consts = list(getattr(sub, "consts", []))
                inner_tracked = {iv: t for iv, t in zip(inner.invars, ins) if t is not None}
                outs = self.run(inner, inner_consts, invals, inner_tracked)
            else:
                if name == "dot_general":
                    self._record(eqn, invals, ins)
                outs = eqn.primitive.bind(*invals, **eqn.params)
                outs = outs if eqn.primitive.multiple_results else [outs]
                if ins and ins[0] is not None:
                    if name == "transpose":
                        path, perm = ins[0]
                        tracked[eqn.outvars[0]] = (path, tuple(perm[p] for p in eqn.params["permutation"]))
                    elif name in _PASS_THROUGH:
                        tracked[eqn.outvars[0]] = ins[0]
            env.update(zip(eqn.outvars, outs))
        return [read(v) for v in jaxpr.outvars]

    def _record(self, eqn: Any, invals: list[Any], ins: list[Any]) -> None:
        (contracting, batch) = eqn.params["dimension_numbers"]
        for side in (0, 1):
            info = ins[side]
            if info is None:
                continue
            path, perm = info
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


def collect_hessians(apply_fn: Callable[..., Any], params: Any, batches: Iterable[Any],
                     where: Callable[[str, Any], bool] | None = None
                     ) -> tuple[dict[str, Hessian], dict[str, str]]:
    """X^T X per params leaf that a matmul reads, summed over ``batches`` (each a tuple of the
    arguments after ``params``; a non-tuple is one argument). Also returns, per leaf left out, why."""
    candidates = _candidates(params, where)
    n_param_leaves = len(jax.tree.leaves(params))
    seen: dict[str, Any] = {}
    contract: dict[str, set[tuple[int, ...]]] = {}
    skipped: dict[str, str] = {}
    compiled: dict[Any, Any] = {}
    n_batches = 0
    for index, batch in enumerate(batches):
        args = batch if isinstance(batch, tuple) else (batch,)
        key = jax.tree.structure(args), tuple((np.shape(a), str(jnp.result_type(a))) for a in jax.tree.leaves(args))
        if key not in compiled:  # a batch shaped like an earlier one traces the same
            try:
                closed = jax.make_jaxpr(apply_fn)(params, *args)
            except Exception as e:  # the user's function: any error means this batch does not fit it
                raise ValueError(f"calibration batch {index}: apply_fn(params, *batch) failed on it "
                                 f"({type(e).__name__}: {e})") from e
            collector = _Collector()

            def stats(flat: list[Any], closed: Any = closed, collector: _Collector = collector) -> dict[str, Any]:
                collector.stats.clear()  # in case jit traces again
                tracked = {closed.jaxpr.invars[i]: (name, tuple(range(np.ndim(flat[i]))))
                           for i, name in candidates}
                collector.run(closed.jaxpr, list(closed.consts), flat, tracked)
                return {p: (s[0], s[1]) for (p, _), s in collector.stats.items()}

            compiled[key] = (jax.jit(stats), collector)
        fn, collector = compiled[key]
        flat = jax.tree.leaves(params) + jax.tree.leaves(args)
        assert len(flat) == n_param_leaves + len(jax.tree.leaves(args))
        out = fn(flat)
        for path, axes in collector.contract.items():
            contract.setdefault(path, set()).update(axes)
        skipped.update(collector.unsupported)
        for path, (xtx, rows) in out.items():
            h = np.asarray(xtx, np.float64)
            prev = seen.get(path)
            seen[path] = (h, rows) if prev is None or prev[0].shape != h.shape else (prev[0] + h, prev[1] + rows)
        n_batches += 1
    if n_batches == 0:
        raise ValueError("calibrate needs at least one calibration batch; batches was empty")
    out_h = {}
    for path, (h, rows) in seen.items():
        if path in skipped:
            continue
        if len(contract[path]) != 1:
            skipped[path] = f"matmuls contract it along different axes {sorted(contract[path])}"
            continue
        out_h[path] = Hessian(h, next(iter(contract[path])), int(rows))
    for _, name in candidates:
        if name not in out_h and name not in skipped:
            skipped[name] = "no matmul reads it"
    return out_h, skipped
