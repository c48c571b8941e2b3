"""The Triton backend's kernels as :class:`KernelSpec`s, and a module's entry as a callable.

``run(*arrays, interpret=True)`` runs the kernel in the Triton interpreter (through
``jax.pure_callback``); ``interpret=False`` calls it through ``jax_triton.triton_call`` (the
runtime's ``call_triton_kernel``, registered with :func:`register_gpu_call`, since codegen does not
import the runtime). A kernel the Triton writer cannot express falls back to the
Pallas backend's kernel, with a warning that names it and the reason, and says so in its source.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from fusec.codegen import pallas
from fusec.codegen.device import commented_program, gpu_builder_for
from fusec.codegen.kernel_spec import KernelSpec, kernel_reference
from fusec.codegen.pallas_refs import identifier
from fusec.codegen.triton.kernel import ArraySig, TritonKernel
from fusec.codegen.triton.source import generate_kernel, kernel_text
from fusec.errors import Unsupported
from fusec.ir import Function, Module, Op

_GPU_CALL: list[Callable[..., list[Any]]] = []


def register_gpu_call(call: Callable[..., list[Any]]) -> None:
    """Sets how a kernel runs on a GPU: ``call(kernel, *arrays) -> outputs``."""
    _GPU_CALL[:] = [call]


def _runner(kernel: TritonKernel) -> Callable[..., list[Any]]:
    def run(*arrays: Any, interpret: bool = True) -> list[Any]:
        results = len(kernel.outputs) - kernel.hidden_outputs
        if interpret:
            from fusec.codegen.triton.interpret import interpret_call
            return interpret_call(kernel, *arrays)[:results]
        if not _GPU_CALL:
            raise Unsupported("the Triton backend has no GPU call registered (fusec.runtime registers jax-triton's)")
        # A low-bit weight's scales may be stored in another dtype than the f32 they are declared.
        actual = tuple(ArraySig(tuple(a.shape), np.dtype(a.dtype).name) for a in arrays)
        launched = kernel if actual == kernel.inputs else dataclasses.replace(kernel, inputs=actual)
        return list(_GPU_CALL[0](launched, *arrays))[:results]
    return run


def masked_arrays(programs: list[Function]) -> tuple[int, ...]:
    """Positions of the kernel's arrays (inputs, then outputs) that some access masks."""
    params = [p.name for p in programs[0].params]
    masked = {o.operands[0].name for f in programs for o in f.ops if o.opcode in ("load", "store", "atomic_add")
              and o.attr("masked")}
    return tuple(i for i, n in enumerate(params) if n in masked)


def build_kernel(op: Op, module: Module, interpret: bool, programs: list[Function] | None = None) -> KernelSpec:
    """The Triton kernel called by ``op``, or (``Unsupported``) the Pallas one, visibly."""
    programs = pallas.tile_programs(op, module) if programs is None else programs
    name = str(op.attr("callee"))
    text = kernel_text(programs)
    try:
        kernel = generate_kernel(op, programs, "k_" + identifier(name))
    except Unsupported as e:
        warnings.warn(f"fusec: kernel {name} runs as a Pallas kernel: the Triton backend cannot express it ({e})",
                      stacklevel=2)
        spec = pallas.build_kernel(op, module, interpret, programs)
        note = f"# fusec: the Triton backend cannot express this kernel ({e}); it runs as a Pallas kernel.\n"
        return KernelSpec(spec.name, "pallas", note + spec.source, spec.tile_program, spec.in_types, spec.out_types,
                          spec.run, spec.reference, spec.interpret, spec.masked_refs, spec.gpu_builder,
                          op=op, module=module, grad_builder=spec.grad_builder)
    # The tile program heads the source as a comment: what the kernel was generated from.
    source = commented_program(text) + kernel.source

    gpu_builder = gpu_builder_for(build_kernel, op, module)
    return KernelSpec(name, "triton", source, text, tuple(v.type for v in op.operands),
                      tuple(r.type for r in op.results), _runner(kernel), kernel_reference(op, module), interpret,
                      masked_arrays(programs), gpu_builder if interpret else None, op=op, module=module,
                      backend_kernel=kernel, grad_builder=pallas.grad_builder_for(build_kernel, op, module, interpret))


KernelCaller = pallas.KernelCaller


def module_to_callable(module: Module, interpret: bool, call_kernel: KernelCaller | None = None,
                       make_weak: Callable[[Any], Any] | None = None
                       ) -> tuple[Callable[..., list[Any]], dict[str, KernelSpec]]:
    """The entry function as a callable whose kernel ops run as Triton kernels, and the kernels
    (repeated layers' kernels built once, as the Pallas backend does)."""
    return pallas.module_to_callable(module, interpret, call_kernel, make_weak, build_kernel)
