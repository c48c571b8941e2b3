"""The model's forward pass on the calibration batches, compiled while calibration does other work.

A budget measures each matrix's effect on the model's outputs by running the model once per matrix
on every batch, which needs one XLA executable per batch shape (about a second each on MiniLM).
``Forward`` traces and lowers them in the caller's thread (so the caller's JAX settings, e.g.
``enable_x64``, apply as they would to ``jax.jit``), then compiles them, and runs the float model
for the reference outputs, in one background thread: XLA releases the GIL, so this overlaps with
the NumPy GPTQ work of the sensitivity phase on another core.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import numpy as np


def _key(args: tuple[Any, ...]) -> Any:
    return jax.tree.structure(args), tuple((np.shape(a), str(jax.numpy.result_type(a))) for a in jax.tree.leaves(args))


class Forward:
    """``outputs(params, i)``: the leaves of ``apply_fn(params, *batches[i])`` as float64 NumPy
    arrays; ``reference(i)``: the same for the float ``params`` given here."""

    def __init__(self, apply_fn: Callable[..., Any], params: Any, batches: list[Any]) -> None:
        self._jit = jax.jit(lambda p, *a: jax.tree.leaves(apply_fn(p, *a)))
        self.batches = [b if isinstance(b, tuple) else (b,) for b in batches]
        lowered: dict[Any, Any] = {}
        self._keys = []
        for b in self.batches:
            key = _key(b)
            if key not in lowered:
                lowered[key] = self._jit.lower(params, *b)
            self._keys.append(key)
        pool = ThreadPoolExecutor(1, thread_name_prefix="fusec-calibrate")
        self._compiled: dict[Any, Future[Any]] = {k: pool.submit(low.compile) for k, low in lowered.items()}
        self._reference = pool.submit(lambda: [self.outputs(params, i) for i in range(len(self.batches))])
        pool.shutdown(wait=False)  # the thread ends once its queue is done

    def outputs(self, params: Any, index: int) -> list[np.ndarray]:
        b = self.batches[index]
        try:
            out = self._compiled[self._keys[index]].result()(params, *b)
        except TypeError:  # params typed differently from the lowered ones (e.g. weak types): jit retraces
            out = self._jit(params, *b)
        return [np.asarray(o, np.float64) for o in out]

    def reference(self, index: int) -> list[np.ndarray]:
        return self._reference.result()[index]
