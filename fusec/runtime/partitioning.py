"""Kernels under the SPMD partitioner: ``jax.experimental.custom_partitioning`` with fusec's rule.

When a program is partitioned over several devices, each kernel lowers as a custom-partitioned
call whose rule (:mod:`fusec.runtime.partition_rule`) says which axes split freely and which a dot
contracts. The partitioner keeps the operands' shardings on the parallel axes and each shard runs
the kernel rebuilt for its own shapes; a contraction split over devices becomes per-shard kernels
plus a ``psum``; axes the rule keeps whole are gathered. One device, or all mesh axes manual
(inside ``shard_map``), lowers the kernel plainly, as does ``jax.export`` (its artifacts cannot
hold the partitioner's Python callback). ``FUSEC_PARTITION_KERNELS=0`` turns this off (the
partitioner then sees the kernel's own code, and usually gathers its operands).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec

from fusec.codegen.device import gpu_device_name
from fusec.codegen.kernel_spec import KernelSpec
from fusec.codegen.pallas import build_kernel
from fusec.ir import Module
from fusec.passes.tiling import tile_kernel_op, tuned_config
from fusec.runtime.jax_internals import lowering_for_export, lowering_mesh, require_devices_during_lowering
from fusec.runtime.partition_rule import PartitionRule, local_kernel_op, partition_rule
from fusec.runtime.primitive import _batched, _lowering, call_kernel, fusec_kernel_p

Pieces = tuple[tuple[str, int], ...]  # (factor, how many parts it is cut into), sorted


def enabled() -> bool:
    """Whether kernels tell the partitioner how they split (``FUSEC_PARTITION_KERNELS``, default on)."""
    return os.environ.get("FUSEC_PARTITION_KERNELS", "1") != "0"


def _depth(spec: KernelSpec) -> int:
    return 0 if spec.batched is None else 1 + _depth(spec.batched[0])


@functools.lru_cache(maxsize=1024)
def rule_of(spec: KernelSpec) -> PartitionRule | None:
    """The kernel's partition rule; a ``vmap``-batched kernel's batch axis is one more free factor."""
    if spec.batched is not None:
        inner, in_axes, size = spec.batched
        rule = rule_of(inner)
        if rule is None:
            return None
        b = f"v{_depth(spec)}"
        operands = tuple(row if axis is None else (*row[:axis], b, *row[axis:])
                         for row, axis in zip(rule.operands, in_axes))
        return dataclasses.replace(rule, operands=operands, results=tuple((b, *row) for row in rule.results),
                                   sizes=rule.sizes | {b: size})
    if spec.op is None or spec.module is None:
        return None
    callee = spec.module.function(str(spec.op.attr("callee")))
    if spec.op.attr("kind") == "attention_bwd" or len(spec.op.results) != len(callee.returns):
        return None  # an attention's backward kernels and log-sum-exp forward: not the callee's rule
    return partition_rule(spec.op, callee)


@functools.lru_cache(maxsize=1024)
def local_spec(spec: KernelSpec, pieces: Pieces) -> KernelSpec:
    """The kernel rebuilt for one shard's shapes."""
    if not pieces:
        return spec
    cut = dict(pieces)
    if spec.batched is not None:
        inner, in_axes, size = spec.batched
        b = f"v{_depth(spec)}"
        local_inner = local_spec(inner, tuple((x, n) for x, n in pieces if x != b))
        return _batched(local_inner, in_axes, size // cut.get(b, 1))
    rule = rule_of(spec)
    assert rule is not None and spec.op is not None and spec.module is not None
    op, callee = local_kernel_op(spec.op, spec.module, rule, cut)
    functions = {callee.name: callee}
    # A shard's GPU kernel takes the config tuned for its shapes too (cache, then shipped file).
    found = None if spec.interpret else tuned_config(op, functions, gpu_device_name())
    op = tile_kernel_op(op, functions, "interpret" if spec.interpret else "gpu", *(found or ()))
    return build_kernel(op, Module((callee,)), spec.interpret)


def _dim_axes(sharding: Any, rank: int) -> list[tuple[str, ...]]:
    """The mesh axes each dimension is split over (none for a sharding without named axes)."""
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return [()] * rank
    out = [() if s is None else (s,) if isinstance(s, str) else tuple(s) for s in spec]
    return (out + [()] * rank)[:rank]


def _assign(rule: PartitionRule, mesh: Any, arg_shapes: Any, result_shapes: Any) -> dict[str, tuple[str, ...]]:
    """Mesh axes per factor, taken from the operands' shardings first, then the results'."""
    assign: dict[str, tuple[str, ...]] = {}
    used: set[str] = set()
    for rows, shapes in ((rule.operands, arg_shapes), (rule.results, result_shapes)):
        for row, s in zip(rows, shapes):
            for x, axes in zip(row, _dim_axes(getattr(s, "sharding", None), len(row))):
                if not axes or x in assign or used & set(axes) or not rule.splittable(x):
                    continue
                if rule.sizes[x] % math.prod(mesh.shape[a] for a in axes):
                    continue
                assign[x] = axes
                used |= set(axes)
    return assign


def _shardings(mesh: Any, rows: tuple[tuple[str, ...], ...], assign: dict[str, tuple[str, ...]]) -> tuple[Any, ...]:
    return tuple(NamedSharding(mesh, PartitionSpec(*(assign.get(x) for x in row))) for row in rows)


def _partition(spec: KernelSpec, rule: PartitionRule, mesh: Any, arg_shapes: Any, result_shape: Any) -> Any:
    assign = _assign(rule, mesh, arg_shapes, result_shape)
    pieces = tuple(sorted((x, math.prod(mesh.shape[a] for a in axes)) for x, axes in assign.items()))
    summed = tuple(a for x in sorted(rule.contracted) if x in assign for a in assign[x])
    additive = set(rule.additive or ())

    def lower_fn(*args: Any) -> tuple[Any, ...]:
        local = local_spec(spec, pieces)
        if summed:  # terms added after the dot are added once, on the first shard along K
            first = jax.lax.axis_index(summed) == 0
            args = tuple(jax.numpy.where(first, a, jax.numpy.zeros_like(a)) if i in additive else a
                         for i, a in enumerate(args))
        outs = call_kernel(local, list(args))
        return tuple(jax.lax.psum(o, summed) for o in outs) if summed else tuple(outs)

    return mesh, lower_fn, _shardings(mesh, rule.results, assign), _shardings(mesh, rule.operands, assign)


def _infer(spec: KernelSpec, rule: PartitionRule, mesh: Any, arg_shapes: Any, result_shape: Any) -> Any:
    assign = _assign(rule, mesh, arg_shapes, ())
    return _shardings(mesh, rule.results, assign)


@functools.lru_cache(maxsize=1024)
def partitioned(spec: KernelSpec) -> Any:
    """The kernel as a custom-partitioned function of its flat operands (None: lower it plainly)."""
    rule = rule_of(spec)
    if rule is None or not rule.operands:  # a kernel of no operands (an iota) is computed replicated
        return None

    def kernel(*args: Any) -> tuple[Any, ...]:
        return tuple(fusec_kernel_p.bind(*args, spec=spec))

    fn = custom_partitioning(kernel)
    whole = [x for x in rule.factors() if not rule.splittable(x)]
    summed = [x for x in rule.factors() if x in rule.contracted and rule.splittable(x)]
    fn.def_partition(partition=functools.partial(_partition, spec, rule),
                     infer_sharding_from_operands=functools.partial(_infer, spec, rule),
                     sharding_rule=rule.einsum(), reduction_factors=tuple(summed),
                     need_replication_factors=tuple(whole))
    return fn


def _partitioned_lowering(ctx: Any, *args: Any, spec: KernelSpec, platform: str) -> Any:
    devices, manual = lowering_mesh(ctx)
    # jax.export cannot serialise the partitioner's Python callback: exported programs lower the
    # kernel plainly (XLA's partitioner then gathers what the kernel reads; results stay right).
    plain = not enabled() or devices <= 1 or manual or lowering_for_export(ctx)
    fn = None if plain else partitioned(spec)
    if fn is None:
        return _lowering(ctx, *args, spec=spec, platform=platform)
    return mlir.lower_fun(lambda *a: fn(*a), multiple_results=True)(ctx, *args)


require_devices_during_lowering(fusec_kernel_p)
for _platform in ("cpu", "cuda"):
    mlir.register_lowering(fusec_kernel_p, functools.partial(_partitioned_lowering, platform=_platform),
                           platform=_platform)
