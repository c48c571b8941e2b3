"""Which axes of each weight a function contracts, read off its jaxpr, so ``quantize`` can group
every weight along the axes its matmul reduces over (``x @ w``: (0,); ``x @ w.T``, ``W @ x``: (1,);
a DenseGeneral output projection [H, Dh, D]: (0, 1))."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

_SUBJAXPR_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _inner(jaxpr: Any) -> Any:
    return getattr(jaxpr, "jaxpr", jaxpr)


def _walk(jaxpr: Any, tracked: dict[Any, tuple[str, tuple[int, ...]]], found: dict[str, set[tuple[int, ...]]]
          ) -> None:
    """``tracked``: jaxpr variable -> (leaf path, permutation of the leaf's axes it holds)."""
    for eqn in jaxpr.eqns:
        ins = [tracked.get(v) if not hasattr(v, "val") else None for v in eqn.invars]
        name = eqn.primitive.name
        if name == "transpose" and ins[0] is not None:
            path, perm = ins[0]
            tracked[eqn.outvars[0]] = (path, tuple(perm[p] for p in eqn.params["permutation"]))  # type: ignore[misc]
        elif name in ("convert_element_type", "copy", "copy_p") and ins[0] is not None:
            tracked[eqn.outvars[0]] = ins[0]
        elif name == "dot_general":
            (lhs_c, rhs_c), _ = eqn.params["dimension_numbers"]
            for info, contract in zip(ins, (lhs_c, rhs_c)):
                if info is not None:
                    path, perm = info
                    found.setdefault(path, set()).add(tuple(sorted(perm[c] for c in contract)))
        else:
            for key in _SUBJAXPR_PARAMS:
                sub = eqn.params.get(key)
                if sub is not None and hasattr(_inner(sub), "eqns"):
                    inner = _inner(sub)
                    _walk(inner, {iv: ins[i] for i, iv in enumerate(inner.invars)  # type: ignore[misc]
                                  if i < len(ins) and ins[i] is not None}, found)


def contraction_axes(fn: Callable[..., Any], *args: Any, argnum: int = 0) -> dict[str, tuple[int, ...]]:
    """For each leaf of ``args[argnum]`` (2-D or larger) that ``fn(*args)`` multiplies, the axes its
    matmuls contract, by path (as :func:`fusec.lowprec.quantize` takes in ``axes=``). A leaf
    contracted along different axes by different matmuls is left out (the default applies)."""
    closed = jax.make_jaxpr(fn)(*args)
    offset = sum(len(jax.tree.leaves(a)) for a in args[:argnum])
    tracked = {}
    for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(args[argnum])[0]):
        if getattr(leaf, "ndim", 0) >= 2:
            tracked[closed.jaxpr.invars[offset + i]] = (jax.tree_util.keystr(path) or "<root>",
                                                        tuple(range(leaf.ndim)))
    found: dict[str, set[tuple[int, ...]]] = {}
    _walk(closed.jaxpr, tracked, found)
    return {path: axes.pop() for path, axes in found.items() if len(axes) == 1}
