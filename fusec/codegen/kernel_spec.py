"""The backend-neutral description of one generated kernel, which the runtime's primitive binds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fusec.codegen.xla import Evaluator
from fusec.ir import Function, LowBitType, Module, Op
from fusec.passes.views import View


@dataclass(frozen=True, eq=False)
class KernelSpec:
    """One generated kernel. Hashable by identity: it is the parameter of fusec's kernel primitive.

    ``run(*arrays, interpret=bool)`` runs it (a low-bit weight passes as its arrays); ``reference``
    runs the kernel's graph-level ops through XLA (for autodiff and checks); ``tile_program`` is the
    tile IR it was generated from and ``source`` the generated code."""

    name: str
    backend: str
    source: str
    tile_program: str
    in_types: tuple[Any, ...]
    out_types: tuple[Any, ...]
    run: Callable[..., list[Any]]
    reference: Callable[..., list[Any]]
    interpret: bool  # tiled for an interpreter (one big block), as runs on a CPU
    masked_refs: tuple[int, ...] = ()  # positions (inputs, then outputs) of arrays some access masks
    # Builds the same kernel tiled for a GPU (None if it cannot be); what lowering for cuda uses.
    gpu_builder: Callable[[], KernelSpec | None] | None = field(default=None, repr=False)
    _gpu: list[KernelSpec | None] = field(default_factory=list, repr=False)
    # What it was built from, for re-building it at one shard's shapes: the kernel op and its
    # module; or, for a kernel under ``vmap``, (unbatched spec, in_axes, batch size).
    op: Op | None = field(default=None, repr=False)
    module: Module | None = field(default=None, repr=False)
    batched: tuple[KernelSpec, tuple[int | None, ...], int] | None = field(default=None, repr=False)
    # The backend's own description of the kernel, where it has one (the Triton backend's TritonKernel).
    backend_kernel: Any = field(default=None, repr=False)
    # An attention kernel's fused backward (codegen.attention_grad.AttentionGrad, or the reason it
    # has none), built on first use by differentiation.
    grad_builder: Callable[[], Any] | None = field(default=None, repr=False)
    _grad: list[Any] = field(default_factory=list, repr=False)

    def __repr__(self) -> str:
        return f"KernelSpec({self.name})"

    def attention_grad(self) -> Any:
        """The fused backward (an ``AttentionGrad``), a string saying why there is none, or None
        for a kernel that is no attention."""
        if self.grad_builder is None:
            return None
        if not self._grad:
            self._grad.append(self.grad_builder())
        return self._grad[0]

    def for_gpu(self) -> KernelSpec | None:
        """The kernel as GPU tiles (itself when it was built for a GPU); None when a view it reads
        through cannot be addressed with GPU blocks."""
        if not self.interpret:
            return self
        if not self._gpu:
            self._gpu.append(self.gpu_builder() if self.gpu_builder is not None else None)
        return self._gpu[0]


@dataclass(frozen=True)
class _ViewIndices:
    """The flat base-array index of every element of a view (for the kernel's reference function)."""

    flat: Any  # numpy int array, the view's shape
    base_shape: tuple[int, ...]

    def take_from(self, base: Any) -> Any:
        return base.reshape(-1)[self.flat.reshape(-1)].reshape(self.flat.shape)

    def scatter_into(self, value: Any) -> Any:
        import jax.numpy as jnp

        out = jnp.zeros(int(np.prod(self.base_shape)), value.dtype)
        return out.at[self.flat.reshape(-1)].set(value.reshape(-1)).reshape(self.base_shape)


def _view_indices(view: View, shape: tuple[int, ...]) -> _ViewIndices:
    strides = np.cumprod((1,) + tuple(reversed(view.base_shape[1:])))[::-1]
    flat = np.zeros(shape, np.int64)
    for a in range(len(view.base_shape)):
        index = np.full(shape, view.offset[a], np.int64)
        for k in range(len(shape)):
            if view.axis[k] == a and view.coef[k]:
                along_k = [-1 if d == k else 1 for d in range(len(shape))]
                index = index + view.coef[k] * np.arange(shape[k]).reshape(along_k)
        flat = flat + index * int(strides[a])
    return _ViewIndices(flat, view.base_shape)


def kernel_reference(op: Op, module: Module) -> Callable[..., list[Any]]:
    """The kernel op's graph-level callee run by XLA on the kernel's arrays (views applied)."""
    func: Function = module.function(str(op.attr("callee")))
    evaluator = Evaluator(module)
    in_views = {int(i): View.decode(v) for i, v in op.attr("in_views", ())}
    out_views = {int(j): View.decode(v) for j, v in op.attr("out_views", ())}

    def reference(*flat: Any) -> list[Any]:
        args: list[Any] = []
        rest = list(flat)
        for p in func.params:  # regroup a low-bit weight's arrays into its tuple
            if isinstance(p.type.elem, LowBitType):
                n = len(p.type.elem.part_types(p.type.shape))
                args.append(tuple(rest[:n]))
            else:
                n = 1
                args.append(rest[0])
            rest = rest[n:]
        viewed = [_view_indices(in_views[i], func.params[i].type.shape).take_from(a) if i in in_views else a
                  for i, a in enumerate(args)]
        outs = evaluator.run(func, viewed)
        return [_view_indices(out_views[j], func.returns[j].type.shape).scatter_into(o) if j in out_views else o
                for j, o in enumerate(outs)]

    return reference
