"""The Pallas backend: each kernel op becomes a ``pallas_call`` whose Python source is generated,
kept for users to read, and exec'd. On NVIDIA GPUs it lowers through Pallas's Triton backend; on a
CPU it runs in Pallas's interpret mode."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fusec.codegen.pallas_access import Access, access
from fusec.codegen.pallas_body import BodyWriter, KernelLayout, jnp_dtype, write_body
from fusec.codegen.pallas_special import SPECIAL_FUNCTIONS, SPECIAL_SOURCE
from fusec.codegen.pallas_unpack import packed_part_rows, unpack_tile
from fusec.codegen.xla import Evaluator
from fusec.errors import FusecError
from fusec.ir import Function, LowBitType, Module, Op, Value
from fusec.passes.tiling import tile_kernel_op
from fusec.passes.views import View, value_block_dims

_PRELUDE = """import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
"""


@dataclass(frozen=True, eq=False)
class KernelSpec:
    """One generated kernel. Hashable by identity: it is the parameter of fusec's kernel primitive."""

    name: str
    source: str
    in_types: tuple[Any, ...]
    out_types: tuple[Any, ...]
    pallas: Callable[..., list[Any]]  # pallas(*args, interpret=bool)
    reference: Callable[..., list[Any]]  # the kernel's ops through XLA
    interpret: bool  # tiled for Pallas's interpreter (one big block), as runs on a CPU
    masked_refs: tuple[int, ...] = ()  # positions (inputs, then outputs) of refs whose blocks can overhang
    # Builds the same kernel tiled for a GPU (None if it cannot be); what lowering for cuda uses.
    gpu_builder: Callable[[], KernelSpec | None] | None = field(default=None, repr=False)
    _gpu: list[KernelSpec | None] = field(default_factory=list, repr=False)

    def __repr__(self) -> str:
        return f"KernelSpec({self.name})"

    def for_gpu(self) -> KernelSpec | None:
        """The kernel as GPU tiles (itself when it was built for a GPU); None when a view it reads
        through cannot be addressed with GPU blocks."""
        if not self.interpret:
            return self
        if not self._gpu:
            self._gpu.append(self.gpu_builder() if self.gpu_builder is not None else None)
        return self._gpu[0]


def _idx(names: list[str]) -> str:
    return "(" + "".join(f"{n}, " for n in names) + ")"


def _block(dims: list[Any]) -> str:
    return "(" + "".join(f"{d}, " for d in dims) + ")"


def _param_roles(func: Function) -> dict[str, str]:
    roles: dict[str, str] = {}
    for dot in (op for op in func.ops if op.opcode == "dot"):
        roles[dot.operands[0].name] = "lhs"
        roles[dot.operands[1].name] = "rhs"
    for dq in (op for op in func.ops if op.opcode == "dequantize"):
        roles.update({v.name: "packed" for v in dq.operands})
    return roles


def generate_source(op: Op, func: Function, ident: str) -> str:
    """The Python source of the kernel body and its ``pallas_call`` wrapper."""
    space, block = tuple(op.attr("space")), tuple(op.attr("block"))
    squeeze, bk = tuple(op.attr("squeeze")), op.attr("bk")
    layout = KernelLayout(space, block, squeeze, bk)
    r = len(space)
    w = BodyWriter(layout)
    roles = _param_roles(func)
    in_views = {int(i): View.decode(v) for i, v in op.attr("in_views", ())}
    out_views = {int(j): View.decode(v) for j, v in op.attr("out_views", ())}
    in_specs: list[str] = []
    loads: list[str] = []
    refs: dict[str, list[Access]] = {}  # parameter name -> its refs (a low-bit weight has several)
    for i, p in enumerate(func.params):
        if isinstance(p.type.elem, LowBitType):
            part_rows = packed_part_rows(p.type)
            refs[p.name] = [access(f"in{i}_{j}", [(rows, None), (block[-1], r - 1)], (rows, p.type.shape[1]), None,
                                   False) for j, rows in enumerate(part_rows)]
            in_specs += [a.spec for a in refs[p.name]]
            continue
        acc = access(f"in{i}", value_block_dims(op, func, p), p.type.shape, in_views.get(i), False)
        refs[p.name] = [acc]
        if p.name not in roles:
            _check_fits(p, layout, func.name)
            loads.append(f"{w.name(p)} = {acc.load()}")
        in_specs.append(acc.spec)
    out_specs, out_shapes, stores = [], [], []
    for j, v in enumerate(func.returns):
        _check_fits(v, layout, func.name)
        acc = access(f"out{j}", value_block_dims(op, func, v), v.type.shape, out_views.get(j), True)
        out_specs.append(acc.spec)
        shape = out_views[j].base_shape if j in out_views else v.type.shape
        out_shapes.append(f"jax.ShapeDtypeStruct({tuple(shape)}, {jnp_dtype(v)})")
        stores.append((acc, v))
    body: list[str] = [f"g = {_idx([f'pl.program_id({d})' for d in range(r)])}"]
    if any(o.opcode == "reduce" for o in func.ops) and space[-1] != block[-1]:
        body.append(f"_cols = lax.broadcasted_iota(jnp.int32, {layout.full_shape}, {len(layout.full_shape) - 1})")
    body += loads
    pending: list[Op] = []
    dots = [o for o in func.ops if o.opcode == "dot"]
    for o in func.ops:
        if o.opcode == "dequantize":
            continue  # unpacked inside the K loop of the dot it feeds
        if o.opcode != "dot":
            pending.append(o)
            continue
        if o is not dots[0]:
            continue  # every dot is computed in the first one's K loop
        write_body(w, pending)
        pending = []
        body += w.lines
        w.lines = []
        body += _dot_loop(w, dots, func, layout, refs)
    write_body(w, pending)
    body += w.lines
    for acc, v in stores:
        body.append(acc.store(w.name(v)))
    arguments = [a.ref for p in func.params for a in refs[p.name]] + [a.ref for a, _ in stores]
    lines = [f"def {ident}_body({', '.join(arguments)}):"] + ["    " + line for line in body]
    lines += [
        "",
        "",
        f"def {ident}(*args, interpret=False):",
        f"    # kernel {func.name}: {op.attr('kind')} over {list(space)}, block {list(block)}, "
        f"grid {list(op.attr('grid'))}",
        "    return pl.pallas_call(",
        f"        {ident}_body,",
        f"        grid={tuple(op.attr('grid'))},",
        "        in_specs=[" + ", ".join(in_specs) + "],",
        "        out_specs=[" + ", ".join(out_specs) + "],",
        "        out_shape=[" + ", ".join(out_shapes) + "],",
        "        interpret=interpret,",
        f"        compiler_params=plgpu.CompilerParams(num_warps={op.attr('num_warps')}, "
        f"num_stages={op.attr('num_stages')}),",
        f"        name={ident!r},  # PTX names allow no dots",
        "    )(*args)",
    ]
    special = SPECIAL_SOURCE if any(o.opcode in SPECIAL_FUNCTIONS for o in func.ops) else ""
    return _PRELUDE + special + "\n\n" + "\n".join(lines) + "\n"


def _check_fits(v: Value, layout: KernelLayout, name: str) -> None:
    shape, space = v.type.shape, layout.space
    if not ((len(shape) == len(space) and all(a in (1, b) for a, b in zip(shape, space)))
            or shape == space[:-1]):
        raise FusecError(f"kernel {name}: {v}: {v.type} has no block in the space {list(space)}")


def _dot_loop(w: BodyWriter, dots: list[Op], func: Function, layout: KernelLayout,
              refs: dict[str, list[Access]]) -> list[str]:
    """The K loop of a matmul: masked loads of K slices, f32 accumulation, cast to the dot's dtype.
    Sibling dots share the lhs: it is loaded once per step for all of them."""
    first = dots[0]
    lhs_ref = refs[first.operands[0].name][0]
    lhs_t = bool(first.attr("lhs_t"))
    lhs = first.operands[0].type
    k = lhs.shape[-2] if lhs_t else lhs.shape[-1]
    bk = int(layout.bk or k)
    steps = -(-k // bk)
    bm, bn = layout.block[-2], layout.block[-1]
    a_k = 0 if lhs_t else 1
    k_slice = (f"kk * {bk}", bk, steps * bk)
    lines = ["def _k_step(kk, accs):", f"    a = {lhs_ref.load({a_k: k_slice})}"]
    if k % bk:
        lines.append(f"    a = jnp.where(lax.broadcasted_iota(jnp.int32, a.shape, {a_k}) + kk * {bk} < {k}, a, "
                     "jnp.zeros_like(a))")
    updates = []
    producers = {r.name: o for o in func.ops for r in o.results}
    for n, dot in enumerate(dots):
        rhs_t = bool(dot.attr("rhs_t"))
        b_k = 1 if rhs_t else 0
        dq = producers.get(dot.operands[1].name)
        if dq is not None and dq.opcode == "dequantize":
            parts = [a for v in dq.operands for a in refs[v.name]]
            lines += ["    " + line for line in unpack_tile(dq, parts, bk, bn, f"b{n}")]
        else:
            rhs_ref = refs[dot.operands[1].name][0]
            lines.append(f"    b{n} = {rhs_ref.load({b_k: k_slice})}")
        if k % bk:
            lines.append(f"    b{n} = jnp.where(lax.broadcasted_iota(jnp.int32, b{n}.shape, {b_k}) + kk * {bk} < {k}, "
                         f"b{n}, jnp.zeros_like(b{n}))")
        precision = dot.attr("precision")
        prec = f", precision=lax.Precision.{precision}" if precision else ""
        updates.append(f"accs[{n}] + lax.dot_general(a, b{n}, ((({a_k},), ({b_k},)), ((), ())), "
                       f"preferred_element_type=jnp.float32{prec})")
    lines.append("    return (" + "".join(f"{u}, " for u in updates) + ")")
    zeros = "".join(f"jnp.zeros(({bm}, {bn}), jnp.float32), " for _ in dots)
    lines.append(f"_accs = lax.fori_loop(0, {steps}, _k_step, ({zeros}))")
    for n, dot in enumerate(dots):
        lines.append(f"{w.name(dot.result)} = _accs[{n}].astype({jnp_dtype(dot.result)})  "
                     f"# {dot.result.name}: {dot.result.type}")
    return lines


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


def build_kernel(op: Op, module: Module, interpret: bool) -> KernelSpec:
    """Generates, compiles (exec) and wraps the kernel called by ``op``."""
    func = module.function(str(op.attr("callee")))
    ident = "k_" + "".join(ch if ch.isalnum() else "_" for ch in func.name)
    source = generate_source(op, func, ident)
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<fusec kernel {func.name}>", "exec"), namespace)
    evaluator = Evaluator(module)
    # The kernel reads and writes the op's operands and results (folded views make them differ
    # from its function's parameters and results).
    in_views = {int(i): View.decode(v) for i, v in op.attr("in_views", ())}
    out_views = {int(j): View.decode(v) for j, v in op.attr("out_views", ())}

    def reference(*flat: Any) -> list[Any]:
        args: list[Any] = []
        rest = list(flat)
        for p in func.params:  # regroup a low-bit weight's arrays into its tuple
            n = len(packed_part_rows(p.type)) if isinstance(p.type.elem, LowBitType) else 1
            args.append(tuple(rest[:n]) if n > 1 or isinstance(p.type.elem, LowBitType) else rest[0])
            rest = rest[n:]
        viewed = [_view_indices(in_views[i], func.params[i].type.shape).take_from(a) if i in in_views else a
                  for i, a in enumerate(args)]
        outs = evaluator.run(func, viewed)
        return [_view_indices(out_views[j], func.returns[j].type.shape).scatter_into(o) if j in out_views else o
                for j, o in enumerate(outs)]

    def gpu_builder() -> KernelSpec | None:
        functions = {f.name: f for f in module.functions}
        try:
            return build_kernel(tile_kernel_op(op, functions, "gpu"), module, False)
        except FusecError:
            return None  # a folded view these blocks cannot address: lowering keeps the interpreter

    return KernelSpec(func.name, source, tuple(v.type for v in op.operands), tuple(r.type for r in op.results),
                      namespace[ident], reference, interpret, masked_refs(source, ident),
                      gpu_builder if interpret else None)


def masked_refs(source: str, ident: str) -> tuple[int, ...]:
    """Positions of the kernel's refs (its arguments, in order) that some load or store masks."""
    header = re.search(rf"def {ident}_body\((.*)\):", source)
    assert header is not None
    names = [n.strip() for n in header.group(1).split(",")]
    return tuple(i for i, n in enumerate(names) if re.search(rf"plgpu\.(load|store)\({n}\b", source))


def kernel_ops(module: Module) -> list[Op]:
    return [op for op in module.entry.ops if op.opcode == "kernel"] + [
        op for f in module.functions[1:] for op in f.ops if op.opcode == "kernel"]


KernelCaller = Callable[[KernelSpec, list[Any]], list[Any]]


def module_to_callable(module: Module, interpret: bool, call_kernel: KernelCaller | None = None,
                       make_weak: Callable[[Any], Any] | None = None
                       ) -> tuple[Callable[..., list[Any]], dict[str, KernelSpec]]:
    """The entry function as a callable whose kernel ops run as Pallas kernels, and the kernels."""
    specs = {str(op.attr("callee")): build_kernel(op, module, interpret) for op in kernel_ops(module)}
    caller = call_kernel or (lambda spec, args: spec.pallas(*args, interpret=spec.interpret))

    def emit_kernel(op: Op, args: list[Any], ev: Evaluator) -> list[Any]:
        # A low-bit weight is a tuple of arrays (planes, scales, zero-points): the kernel takes each.
        flat = [x for a in args for x in (a if isinstance(a, tuple) else (a,))]
        return list(caller(specs[str(op.attr("callee"))], flat))

    evaluator = Evaluator(module, overrides={"kernel": emit_kernel}, make_weak=make_weak)
    return (lambda *args: evaluator.run(module.entry, args)), specs
