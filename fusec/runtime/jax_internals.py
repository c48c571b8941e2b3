"""The one place fusec touches JAX internals, each use guarded so a JAX upgrade degrades gracefully.

Where JAX releases differ, the difference is decided here, once, at import, from what the installed
JAX has (not from its version number), and named by a module constant the tests check per version:

- ``PALLAS_TRITON_ASKS_GPU_INFO``: JAX 0.11 and 0.12 ask the device (or the abstract mesh's
  ``AbstractDevice``) for the compute capability when lowering a Pallas-Triton kernel and fail with
  "No supported GPU devices found" on a machine without one; JAX 0.10 falls back to sm_90 itself.
  :func:`gpu_lowering_target` gives those releases the same sm_90 target (an H100) when lowering for
  ``cuda`` on a machine with no GPU.
- ``DCE_RULES_TAKE_LIVE_INPUTS``: JAX 0.12 calls dead-code-elimination rules with the inputs'
  liveness as well, ``rule(used_outputs, live_inputs, eqn)``; jax-triton 0.4.1's rule takes two
  arguments and fails there, so :func:`load_jax_triton` adapts it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import os
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import jax
from jax._src.interpreters import partial_eval as pe

try:  # jax 0.10 to 0.12
    from jax._src.lax.lax import _convert_element_type as _convert_with_weak_type
except ImportError:  # pragma: no cover - a JAX release without it
    _convert_with_weak_type = None

# jax >= 0.11: jax._src.pallas.triton.gpu_info decides the compute capability of a Triton lowering.
PALLAS_TRITON_ASKS_GPU_INFO: bool = importlib.util.find_spec("jax._src.pallas.triton.gpu_info") is not None
# jax >= 0.12: rule(used_outputs, live_inputs, eqn); before: rule(used_outputs, eqn).
DCE_RULES_TAKE_LIVE_INPUTS: bool = len(inspect.signature(pe._default_dce_rule).parameters) == 3
# The GPU a CPU machine lowers for: sm_90, what JAX 0.10 assumes without a GPU.
DEFAULT_GPU_KIND = "NVIDIA H100"


def make_weak(x: Any) -> Any:
    """``x`` marked weakly typed, as JAX marks results computed only from Python scalars.

    fusec's IR spells dtypes out, so its results are strongly typed; outputs that ``jax.jit`` would
    return weakly typed get the mark back here, so they promote the same way afterwards.
    """
    if _convert_with_weak_type is None:
        return x
    return _convert_with_weak_type(x, weak_type=True)


@functools.cache
def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:  # pragma: no cover - no backend at all
        return False


@contextlib.contextmanager
def gpu_lowering_target(platform: str, device_kind: str = DEFAULT_GPU_KIND) -> Iterator[None]:
    """Around a kernel's lowering for ``platform``: for ``cuda`` on JAX releases whose Pallas-Triton
    lowering asks for the GPU, on a machine without one (and with no GPU ``AbstractDevice`` set by
    the caller), lowers for ``device_kind``'s architecture through the abstract mesh, keeping its
    axes; otherwise does nothing."""
    if platform != "cuda" or not PALLAS_TRITON_ASKS_GPU_INFO or _has_gpu():
        yield
        return
    from jax._src import mesh as mesh_lib

    current = mesh_lib.get_abstract_mesh()
    if current.abstract_device is not None and current.abstract_device.platform == "gpu":
        yield
        return
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")
    with jax.sharding.use_abstract_mesh(current.update(abstract_device=device)):
        yield


def load_jax_triton() -> ModuleType:
    """``jax_triton``, imported on first use (only where Triton kernels are lowered: ``import fusec``
    needs neither it nor a GPU package) and fitted to the running JAX: its DCE rule adapted where
    JAX passes input liveness, ``TRITON_CACHE_DIR`` left as it was (some releases clear it on
    import), and, on a machine without a GPU, the target's compute capability taken from
    :func:`gpu_lowering_target`'s sm_90 instead of asking a device. Raises ImportError where
    jax-triton cannot load (a CPU-only jaxlib without the CUDA plugin, for jax-triton 0.3)."""
    cache_dir = os.environ.get("TRITON_CACHE_DIR")
    try:
        import jax_triton
        from jax_triton import triton_lib
    finally:  # put back even when the import fails (it may clear the variable before failing)
        if cache_dir is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = cache_dir
    primitive = triton_lib.triton_kernel_call_p
    rule = pe.dce_rules.get(primitive)
    if DCE_RULES_TAKE_LIVE_INPUTS and rule is not None and len(inspect.signature(rule).parameters) == 2:
        pe.dce_rules[primitive] = lambda used_outputs, live_inputs, eqn: rule(used_outputs, eqn)
    lib = triton_lib.triton_kernel_call_lib
    if not _has_gpu() and not getattr(lib, "_fusec_cpu_target", False):
        try:
            lib.get_compute_capability = lambda device: 90
            lib._fusec_cpu_target = True
        except AttributeError:  # pragma: no cover - a read-only extension module
            pass
    return jax_triton


def triton_kernels_in(lowered: Any) -> list[tuple[str, dict[str, Any]]]:
    """The Triton IR text (TTIR) and launch parameters of every Pallas-Triton kernel in a program
    lowered for ``cuda``: [(ttir_text, {"num_warps": .., "num_stages": .., "grid": (x, y, z)})]."""
    from jax._src.lib import triton as jax_triton_dialect
    from jax._src.lib.mlir import ir

    calls: list[Any] = []

    def walk(op: Any) -> None:
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    if inner.operation.name == "stablehlo.custom_call" and \
                            "__gpu$xla.gpu.triton" in str(inner.attributes["call_target_name"]):
                        calls.append(inner)
                    walk(inner)

    walk(lowered.compiler_ir("stablehlo").operation)
    out = []
    for call in calls:
        config = call.attributes["mhlo.backend_config"]
        with ir.Context() as ctx:
            jax_triton_dialect.dialect.register_dialect(ctx)
            ctx.allow_unregistered_dialects = True
            ttir = ir.Module.parse(config["ir"].value_bytes).operation.get_asm(enable_debug_info=False)
        grid = tuple(int(config[f"grid_{axis}"].value) if f"grid_{axis}" in config else 1 for axis in "xyz")
        out.append((ttir, {"num_warps": int(config["num_warps"].value), "num_stages": int(config["num_stages"].value),
                           "grid": grid}))
    return out


def varying_axes(aval: Any) -> frozenset[Any]:
    """The manual mesh axes ``aval`` varies over inside ``shard_map`` (its "vma"): jax 0.10 keeps
    them in ``aval.manual_axis_type.varying``, earlier releases in ``aval.vma``."""
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(getattr(mat, "varying", ()))
    return frozenset(getattr(aval, "vma", ()))


def kernel_result_aval(shape: tuple[int, ...], dtype: Any, in_avals: Sequence[Any]) -> Any:
    """A kernel result's aval: inside ``shard_map`` (``check_vma=True``) it varies over every manual
    axis some input varies over, on the inputs' (abstract) mesh; elsewhere a plain ShapedArray."""
    vma = frozenset().union(*(varying_axes(a) for a in in_avals))
    plain = jax.core.ShapedArray(shape, dtype)
    if not vma:
        return plain
    template = next(a for a in in_avals if varying_axes(a))
    if getattr(template, "manual_axis_type", None) is None:  # a JAX that keeps them in ``vma``
        return plain.update(vma=vma)
    mesh = template.sharding.mesh
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*([None] * len(shape))))
    return plain.update(sharding=sharding, manual_axis_type=template.manual_axis_type.update(varying=vma))


def lowering_mesh(ctx: Any) -> tuple[int, bool]:
    """How many devices a lowering rule's context partitions over, and whether some mesh axis is
    manual there (inside ``shard_map``, where a kernel sees one shard's arrays along it)."""
    axis_context = getattr(ctx.module_context, "axis_context", None)
    mesh = getattr(axis_context, "mesh", None)
    manual = frozenset(getattr(axis_context, "manual_axes", ()) or ())
    if mesh is not None:
        names = tuple(getattr(mesh, "axis_names", ()))
        return int(getattr(mesh, "size", 1)), bool(names) and bool(manual)
    return int(getattr(axis_context, "num_devices", 1) or 1), False


def require_devices_during_lowering(primitive: Any) -> None:
    """Asks JAX to give ``primitive``'s lowering the device assignment and mesh (as it does for
    ``custom_partitioning``, which a partitioned kernel lowers to)."""
    from jax._src import dispatch

    dispatch.prim_requires_devices_during_lowering.add(primitive)


def without_manual_axes(ctx: Any) -> Any:
    """A lowering rule's context with its avals stripped of varying manual axes and mesh. A
    kernel's lowering traces its ``pallas_call`` again, which inside ``shard_map`` would want vma
    on every output shape and carry; the kernel's abstract evaluation gave its results theirs."""
    def plain(aval: Any) -> Any:
        if not isinstance(aval, jax.core.ShapedArray):
            return aval
        return jax.core.ShapedArray(aval.shape, aval.dtype, aval.weak_type)

    if not any(varying_axes(a) for a in (*ctx.avals_in, *ctx.avals_out)):
        return ctx
    return ctx.replace(avals_in=[plain(a) for a in ctx.avals_in], avals_out=[plain(a) for a in ctx.avals_out])


def without_vma_checks() -> Any:
    """A context in which JAX does not check varying manual axes (used with
    :func:`without_manual_axes` while a kernel's ``pallas_call`` is traced for lowering)."""
    from jax._src import config

    flag = getattr(config, "_check_vma", None)
    return flag(False) if flag is not None else contextlib.nullcontext()


@contextlib.contextmanager
def relaxed_float_atomics() -> Iterator[None]:
    """A context in which Pallas's Triton lowering emits float atomic adds with relaxed ordering
    (``red``, no fence per add) instead of acq_rel; integer atomics keep acq_rel. fusec's only
    float atomics are split-K partial sums, ordered by the kernel's end or, in a fixup, by the
    barrier and the integer arrival count's release (Pallas exposes no ``sem`` of its own: with
    acq_rel, ptxas fences every add, one L2 round trip each at the kernel's end)."""
    try:
        from jax._src.lib.triton import dialect as tt
        from jax._src.pallas.triton import lowering
    except ImportError:  # no Pallas Triton lowering: nothing to change
        yield
        return
    original = getattr(lowering, "_atomic_rmw", None)
    if original is None:
        yield
        return

    def rmw(op: Any, ptr: Any, val: Any, mask: Any = None, *args: Any, **kwargs: Any) -> Any:
        if op == tt.RMWOp.FADD and not args and "semantic" not in kwargs:
            kwargs["semantic"] = tt.MemSemantic.RELAXED
        return original(op, ptr, val, mask, *args, **kwargs)

    lowering._atomic_rmw = rmw
    try:
        yield
    finally:
        lowering._atomic_rmw = original


def abstract_struct(x: Any) -> Any:
    """A ``jax.ShapeDtypeStruct`` of ``x`` that keeps its weak type and, inside ``shard_map``, the
    manual axes it varies over (so a program traced from it inserts the same ``pvary``s)."""
    aval = jax.typeof(x)
    vma = varying_axes(aval)
    if not vma:
        return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type, manual_axis_type=mat,
                                    sharding=aval.sharding)
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type, vma=vma)


def lowering_for_export(ctx: Any) -> bool:
    """Whether a lowering rule runs for ``jax.export`` (whose artifacts cannot hold the Python
    callback ``custom_partitioning`` leaves for the partitioner)."""
    params = getattr(ctx.module_context, "lowering_parameters", None)
    return bool(getattr(params, "for_export", False))
