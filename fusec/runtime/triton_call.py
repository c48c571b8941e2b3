"""Calling a generated Triton kernel from JAX through ``jax_triton.triton_call``.

The kernel's launch (grid, warps, stages, constexprs, outputs to zero) comes from its
:class:`~fusec.codegen.triton.kernel.TritonKernel`; what differs between jax-triton releases is
decided here from the installed ``triton_call``'s signature:

- jax-triton 0.3 names the outputs ``out_shape``; 0.4 names them ``out_type`` (and warns on
  ``out_shape``).
- Outputs a kernel accumulates into (atomics) are zeroed by jax-triton itself (``zeroed_outputs``),
  which keeps the kernel's parameters (inputs, then outputs) the same on both releases.
  (``input_output_aliases`` would not: 0.3 passes an aliased output its own pointer as well, 0.4
  does not.) 0.4 deprecates ``zeroed_outputs`` with a warning, silenced around this one call.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any

import jax
import numpy as np

from fusec.codegen.triton.kernel import ArraySig, TritonKernel
from fusec.codegen.triton.load import jit_function
from fusec.runtime.jax_internals import load_jax_triton

# jax-triton 0.3 binds its primitive with the constexprs as keywords next to these.
_BIND_PARAMETERS = frozenset({"fn", "scalar_args", "out_shapes", "in_tree", "metaparams", "custom_call_target_name"})


@functools.cache
def _call_parameters() -> frozenset[str]:
    return frozenset(inspect.signature(load_jax_triton().triton_call).parameters)


def _check(kernel: TritonKernel, arrays: tuple[Any, ...]) -> None:
    if len(arrays) != len(kernel.inputs):
        raise ValueError(f"kernel {kernel.name!r} takes {len(kernel.inputs)} arrays, got {len(arrays)}")
    for i, (array, sig) in enumerate(zip(arrays, kernel.inputs)):
        if not hasattr(array, "dtype"):
            raise ValueError(f"kernel {kernel.name!r} argument {i}: expected an array, got {type(array).__name__}")
        shape, dtype = tuple(array.shape), np.dtype(array.dtype)
        if shape != tuple(sig.shape) or dtype != np.dtype(sig.dtype):
            raise ValueError(f"kernel {kernel.name!r} argument {i}: expected {sig.dtype}{list(sig.shape)}, "
                             f"got {dtype}{list(shape)}")
    if not 1 <= len(kernel.grid) <= 3 or any(int(g) < 1 for g in kernel.grid):
        raise ValueError(f"kernel {kernel.name!r}: grid must be 1 to 3 positive sizes, got {kernel.grid}")
    bad = [i for i in kernel.zeroed_outputs if not 0 <= i < len(kernel.outputs)]
    if bad:
        raise ValueError(f"kernel {kernel.name!r}: zeroed_outputs {bad} name no output "
                         f"(it has {len(kernel.outputs)})")


def _out(sig: ArraySig) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(sig.shape), np.dtype(sig.dtype))


def call_triton_kernel(kernel: TritonKernel, *arrays: Any, compute_capability: int | None = None) -> list[jax.Array]:
    """Runs ``kernel`` on ``arrays`` (one per ``kernel.inputs``, in order) through
    ``jax_triton.triton_call`` and returns its outputs, one per ``kernel.outputs``.

    Works under ``jax.jit`` and lowers for ``cuda`` on any machine once jax-triton loads (see
    :func:`~fusec.runtime.jax_internals.load_jax_triton`); runs only on an NVIDIA GPU.
    ``compute_capability`` (80, 90, ...) chooses the target instead of the device's."""
    _check(kernel, arrays)
    jt = load_jax_triton()
    params = _call_parameters()
    constexprs = dict(kernel.constexprs)
    clash = sorted(set(constexprs) & (params | _BIND_PARAMETERS))
    if clash:
        raise ValueError(f"kernel {kernel.name!r}: constexpr names {clash} collide with triton_call's own keywords")
    outs = [_out(sig) for sig in kernel.outputs]
    kwargs: dict[str, Any] = {("out_type" if "out_type" in params else "out_shape"): outs}
    if kernel.zeroed_outputs:
        kwargs["zeroed_outputs"] = tuple(kernel.zeroed_outputs)
    # FMA contraction on, as XLA's GPU backend does; said explicitly (triton 3.9 warns otherwise).
    if "enable_fp_fusion" in params:
        kwargs["enable_fp_fusion"] = True
    elif "backend_options" in params:
        kwargs["backend_options"] = {"enable_fp_fusion": True}
    if compute_capability is not None:
        kwargs["compute_capability"] = int(compute_capability)
    fn = jit_function(kernel, interpret=False)
    with warnings.catch_warnings():
        # jax-triton 0.4 deprecates zeroed_outputs (in favour of Refs, which change the kernel's
        # parameters); the call is still supported there and is the one both releases share.
        warnings.filterwarnings("ignore", message="zeroed_outputs is deprecated", category=DeprecationWarning)
        results = jt.triton_call(*arrays, kernel=fn, grid=tuple(int(g) for g in kernel.grid),
                                 num_warps=kernel.num_warps, num_stages=kernel.num_stages, **kwargs, **constexprs)
    results = list(results) if isinstance(results, (list, tuple)) else [results]
    assert len(results) == len(kernel.outputs), (len(results), len(kernel.outputs))
    return results



def plugin_install_command() -> str:
    """The pip command that lets jax-triton lower for ``cuda`` on this machine (without a GPU too)."""
    from importlib.metadata import version

    return f"pip install --no-deps jax-cuda12-plugin=={version('jaxlib')}"


# A masked 8-element copy with one output left unused: tracing it exercises jax-triton's DCE rule,
# lowering it its whole cuda path.
_PROBE = TritonKernel(
    name="fusec_probe",
    source="import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
           "def fusec_probe(x_ptr, o_ptr, p_ptr, BLOCK: tl.constexpr):\n"
           "    i = tl.arange(0, BLOCK)\n"
           "    x = tl.load(x_ptr + i, mask=i < 8, other=0.0)\n"
           "    tl.store(o_ptr + i, x, mask=i < 8)\n"
           "    tl.store(p_ptr + i, x, mask=i < 8)\n",
    grid=(1,),
    inputs=(ArraySig((8,), "float32"),),
    outputs=(ArraySig((8,), "float32"), ArraySig((8,), "float32")),
    constexprs=(("BLOCK", 8),),
)


@functools.cache
def triton_backend_problem() -> str | None:
    """Why the Triton backend cannot lower kernels for ``cuda`` with the installed jax, jaxlib and
    jax-triton (one line, for a resolver that falls back to Pallas and says so), or None when a
    probe kernel traces and lowers. Cached: the answer depends only on what is installed."""
    try:
        jt = load_jax_triton()
    except ImportError as e:
        return f"jax-triton does not load ({_first_line(e)}); on a machine without a GPU: {plugin_install_command()}"
    if getattr(jt.triton_lib, "triton_kernel_call_lib", None) is None or \
            not hasattr(jt.triton_lib.triton_kernel_call_lib, "TritonKernel"):
        return f"jax-triton {_version(jt)} has no GPU kernel-call library (the CUDA plugin is missing): " \
               f"{plugin_install_command()}"
    from fusec.runtime.jax_internals import gpu_lowering_target

    x = jax.ShapeDtypeStruct((8,), np.float32)
    try:
        with gpu_lowering_target("cuda"):
            text = jax.jit(lambda a: call_triton_kernel(_PROBE, a)[0]).trace(x).lower(
                lowering_platforms=("cuda",)).as_text()
    except Exception as e:  # any failure means: do not use this backend here
        return f"jax-triton {_version(jt)} with jax {jax.__version__} fails: {type(e).__name__}: {_first_line(e)}"
    if "triton_kernel_call" not in text:
        return f"jax-triton {_version(jt)} with jax {jax.__version__} lowers no triton_kernel_call custom call"
    return None


def _version(module: Any) -> str:
    return str(getattr(module, "__version__", "?"))


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0].rstrip(".:") if lines else ""
