"""Runs a :class:`TritonKernel` in the Triton interpreter on NumPy arrays (no torch, no GPU).

The interpreter wants torch tensors; :class:`_HostArray` is the little of torch's tensor
interface it uses, over a NumPy array. The interpreted kernel is a function of its own module
(load.py scopes the interpreter mode to it), so Triton compilation elsewhere in the process is
untouched. Inside ``jax.jit`` kernels run through ``jax.pure_callback`` (:func:`interpret_call`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from fusec.codegen.triton.interpret_math import LIBDEVICE
from fusec.codegen.triton.kernel import ArraySig, TritonKernel
from fusec.codegen.triton.load import jit_function

# The interpreter keeps its grid position in one global builder: one kernel at a time.
_LOCK = threading.Lock()
# Every kernel run through jax (interpret_call) checks its accesses' bounds (tests; debugging).
CHECK_BOUNDS = os.environ.get("FUSEC_TRITON_CHECK_BOUNDS", "") == "1"


class _HostArray:
    """A NumPy array dressed as the torch tensor the Triton interpreter expects."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.dtype = array.dtype.name  # Triton's type mangling reads torch-style dtype names

    def data_ptr(self) -> int:
        return int(self.array.ctypes.data)

    def untyped_storage(self) -> _HostArray:
        return self

    def cpu(self) -> _HostArray:
        return self  # already host memory: the interpreter reads and writes it in place

    def new_empty(self, *shape: Any, **kwargs: Any) -> _HostArray:
        return _HostArray(self.array)

    def set_(self, storage: _HostArray, offset: int, size: Any, stride: Any) -> _HostArray:
        self.array = storage.array
        return self

    def storage_offset(self) -> int:
        return 0

    def size(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def stride(self) -> tuple[int, ...]:
        return tuple(s // self.array.itemsize for s in self.array.strides)

    def copy_(self, other: _HostArray) -> _HostArray:
        if other.array is not self.array:
            self.array[...] = other.array
        return self


def numpy_dtype(name: str) -> np.dtype:
    import ml_dtypes  # noqa: F401  (registers bfloat16 and friends with NumPy)

    return np.dtype(getattr(ml_dtypes, name)) if name in ("bfloat16", "float8_e4m3fn") else np.dtype(name)


def interpreted(kernel: TritonKernel) -> Any:
    """The kernel's interpreted ``@triton.jit`` function, its libdevice calls run by NumPy."""
    fn = jit_function(kernel, interpret=True)
    fn.fn.__globals__["libdevice"] = LIBDEVICE
    return fn


class OutOfBounds(AssertionError):
    """An access of a kernel reached memory outside every array it was given."""


def run_interpreted(kernel: TritonKernel, *arrays: Any, check_bounds: bool = False) -> list[np.ndarray]:
    """Runs the kernel on host arrays (inputs in ``kernel.inputs`` order); returns its outputs.
    ``check_bounds``: every element a load, store or atomic reaches (its mask true) must lie inside
    one of the kernel's arrays, else :class:`OutOfBounds` names the access."""
    if len(arrays) != len(kernel.inputs):
        raise ValueError(f"kernel {kernel.name} takes {len(kernel.inputs)} arrays, got {len(arrays)}")
    ins = []
    for i, (a, sig) in enumerate(zip(arrays, kernel.inputs)):
        a = np.ascontiguousarray(np.asarray(a))
        if sig.shape == () and a.shape == (1,):  # a scalar argument may reach the callback as [1]
            a = a.reshape(())
        if tuple(a.shape) != sig.shape:
            raise ValueError(f"kernel {kernel.name}: input {i} has shape {a.shape}, expected {sig.shape}")
        ins.append(a)
    # Every output starts as zeros: those the kernel adds into (zeroed_outputs) need it, and the
    # rest are written whole.
    outs = [np.zeros(sig.shape, numpy_dtype(sig.dtype)) for sig in kernel.outputs]
    if check_bounds:  # each array between guard regions, so an overhang cannot land in a neighbour
        ins, outs = [_guarded(a) for a in ins], [_guarded(a) for a in outs]
    fn = interpreted(kernel)
    checked = _bounds_checked(kernel, [*ins, *outs]) if check_bounds else contextlib.nullcontext()
    with _LOCK, _rounding_bf16(), checked:
        try:
            fn[kernel.grid](*map(_HostArray, ins), *map(_HostArray, outs), **dict(kernel.constexprs))
        except Exception as e:  # the interpreter wraps what a kernel raises: the bounds check's own
            if isinstance(e.__cause__, OutOfBounds):
                raise e.__cause__ from None
            raise
    return outs


@contextlib.contextmanager
def _rounding_bf16() -> Iterator[None]:
    """The interpreter's float32 -> bfloat16 conversion, rounded to nearest even as a GPU's is (the
    interpreter truncates), for the duration of one kernel run."""
    import ml_dtypes
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    cast, fp_to_fp = builder.cast_impl, builder.create_fp_to_fp

    def rounded(src: Any, dst_type: Any) -> Any:
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = src.data.astype(ml_dtypes.bfloat16).view(np.uint16)
            return interpreter.TensorHandle(data, dst_type.scalar)
        return None

    def cast_impl(src: Any, dst_type: Any) -> Any:
        out = rounded(src, dst_type)
        return cast(src, dst_type) if out is None else out

    def create_fp_to_fp(src: Any, dst_type: Any, mode: Any) -> Any:
        out = rounded(src, dst_type) if mode is None or str(mode).endswith("RTNE") else None
        return fp_to_fp(src, dst_type, mode) if out is None else out

    builder.cast_impl, builder.create_fp_to_fp = cast_impl, create_fp_to_fp
    try:
        yield
    finally:
        del builder.cast_impl, builder.create_fp_to_fp


def _guarded(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` in the middle of a buffer three times its size (plus a page each side)."""
    guard = a.nbytes + 4096
    buffer = np.zeros(2 * guard + a.nbytes + 64, np.uint8)
    start = guard + (-(buffer.ctypes.data + guard) % 64)
    out = buffer[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


@contextlib.contextmanager
def _bounds_checked(kernel: TritonKernel, arrays: list[np.ndarray]) -> Iterator[None]:
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    spans = sorted((int(a.ctypes.data), int(a.ctypes.data) + a.nbytes) for a in arrays if a.size)
    starts = np.array([lo for lo, _ in spans], np.uint64)
    ends = np.array([hi for _, hi in spans], np.uint64)
    load, store, rmw = builder.create_masked_load, builder.create_masked_store, builder.create_atomic_rmw

    def check(kind: str, ptrs: Any, mask: Any) -> None:
        width = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        reached = np.broadcast_to(ptrs.data, np.shape(mask.data))[np.asarray(mask.data, bool)].astype(np.uint64)
        at = np.searchsorted(starts, reached, side="right") - 1
        inside = (at >= 0) & (reached + np.uint64(width) <= ends[np.maximum(at, 0)])
        if not np.all(inside):
            raise OutOfBounds(f"kernel {kernel.name}: a {kind} reaches {int((~inside).sum())} element(s) outside "
                              "every array it was given")

    def checked_load(ptrs: Any, mask: Any, *rest: Any) -> Any:
        check("load", ptrs, mask)
        return load(ptrs, mask, *rest)

    def checked_store(ptrs: Any, value: Any, mask: Any, *rest: Any) -> Any:
        check("store", ptrs, mask)
        return store(ptrs, value, mask, *rest)

    def checked_rmw(op: Any, ptrs: Any, value: Any, mask: Any, *rest: Any) -> Any:
        check("atomic", ptrs, mask)
        return rmw(op, ptrs, value, mask, *rest)

    builder.create_masked_load, builder.create_masked_store = checked_load, checked_store
    builder.create_atomic_rmw = checked_rmw
    try:
        yield
    finally:
        del builder.create_masked_load, builder.create_masked_store, builder.create_atomic_rmw


def interpret_call(kernel: TritonKernel, *arrays: Any) -> list[Any]:
    """The kernel on JAX arrays or tracers, run by the interpreter through ``jax.pure_callback``."""
    import jax

    shapes = [jax.ShapeDtypeStruct(sig.shape, numpy_dtype(sig.dtype)) for sig in kernel.outputs]
    actual = tuple(ArraySig(tuple(a.shape), np.dtype(a.dtype).name) for a in arrays)
    run_kernel = kernel if actual == kernel.inputs else _with_inputs(kernel, actual)
    outs = jax.pure_callback(lambda *xs: run_interpreted(run_kernel, *xs, check_bounds=CHECK_BOUNDS), shapes, *arrays,
                             vmap_method="sequential")
    return list(outs)


def _with_inputs(kernel: TritonKernel, inputs: tuple[ArraySig, ...]) -> TritonKernel:
    import dataclasses

    return dataclasses.replace(kernel, inputs=inputs)
