"""What one generated Triton kernel is, independent of how it runs (interpreter or jax-triton)."""

from __future__ import annotations

from dataclasses import dataclass

# A line of every kernel's source: the loader sets it True for the interpreter (load.py), so one
# source serves both (16-bit float dots widen to float32 only there).
INTERPRETED_FLAG = "FUSEC_INTERPRETED = tl.constexpr(False)"


@dataclass(frozen=True)
class ArraySig:
    """The shape and NumPy dtype name (``"float32"``, ``"uint8"``, ...) of one kernel array."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class TritonKernel:
    """One generated ``@triton.jit`` kernel.

    The kernel's positional parameters are one pointer per input (in ``inputs`` order), then one
    pointer per output (``outputs`` order) -- the order ``jax_triton.triton_call`` passes them --
    then the ``constexprs`` by keyword. Arrays are dense row-major; strides are baked into the
    source. ``zeroed_outputs`` lists outputs the kernel accumulates into (atomics), which the caller
    must zero first; the last ``hidden_outputs`` outputs are the kernel's own workspace (a split-K
    fixup's), not results."""

    name: str  # the @triton.jit function's name in ``source``
    source: str  # a whole module: imports, helpers, the kernel
    grid: tuple[int, ...]
    inputs: tuple[ArraySig, ...]
    outputs: tuple[ArraySig, ...]
    constexprs: tuple[tuple[str, int], ...] = ()
    num_warps: int = 4
    num_stages: int = 2
    zeroed_outputs: tuple[int, ...] = ()
    hidden_outputs: int = 0  # the last outputs are the kernel's own workspace, dropped after the call
