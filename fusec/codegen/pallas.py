"""The Pallas backend: each kernel's tile program becomes a ``pallas_call`` whose Python source is
generated, kept for users to read, and exec'd (registered with ``linecache``, so a traceback
inside a kernel shows its source lines). On NVIDIA GPUs it lowers through Pallas's Triton
backend; on a CPU it runs in Pallas's interpret mode."""

from __future__ import annotations

import linecache
import re
from collections.abc import Callable
from typing import Any

from fusec.codegen.device import commented_program, gpu_builder_for
from fusec.codegen.kernel_spec import KernelSpec, kernel_reference
from fusec.codegen.pallas_body import BodyWriter
from fusec.codegen.pallas_refs import RefPlan, access_source, identifier, plan_refs
from fusec.codegen.pallas_special import SPECIAL_FUNCTIONS, SPECIAL_SOURCE
from fusec.codegen.pallas_text import jnp_dtype
from fusec.codegen.pallas_unpack import ASM_FLAG
from fusec.codegen.xla import Evaluator
from fusec.ir import Function, KernelTiling, Module, Op, Value, parse_elem_type, print_function
from fusec.ir.tile_ops import ACCESS_OPS, access_indices, access_predicate, loop_bounds, pair_is_table, scratch_params
from fusec.passes.to_tile import lower_kernel
from fusec.passes.tune_space import canonical_kernel_text

_PRELUDE = """import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
"""

__all__ = ["KernelSpec", "build_kernel", "generate_source", "kernel_ops", "module_to_callable"]


def _write(w: BodyWriter, programs: Module, func: Function, plans: dict[str, RefPlan], refs: dict[str, str]) -> None:
    """Writes ``func``'s ops; ``refs`` maps its array parameters to the program's."""
    # Scales and zero-points reach unpack in their stored dtype; it converts them (and may use it).
    uncast = {v.name for o in func.ops if o.opcode == "unpack" for v in o.operands}
    for op in func.ops:
        if op.opcode in ACCESS_OPS:
            plan = plans[refs[op.operands[0].name]]
            indices = [w.index_name(v) for v in access_indices(op)]
            when = access_predicate(op)
            pred = w.name(when) if when is not None else None
            if op.opcode == "load":
                # A low-bit weight's scales are declared f32: read as f32, whatever dtype stores them.
                cast = ".astype(jnp.float32)" if str(op.result.type.elem) == "f32" and \
                    op.result.name not in uncast else ""
                w.line(f"{w.name(op.result)} = {access_source(plan, op, indices, when=pred)}{cast}  "
                       f"# {op.result.name}: {op.result.type}")
            else:
                w.line(access_source(plan, op, indices, w.name(op.operands[1]), when=pred))
        elif op.opcode == "barrier":
            # Interpret mode runs one program at a time and has no barrier to lower.
            w.line("if _on_gpu:")
            w.line("    plgpu.debug_barrier()")
        elif op.opcode == "arrive":
            ref = plans[refs[op.operands[0].name]].ref
            w.line(f"{w.name(op.result)} = plgpu.atomic_add({ref}, ({w.index_name(op.operands[1])},), jnp.int32(1))"
                   f"  # {op.result.name}: the count before this program's arrival")
        elif op.opcode == "loop":
            _write_loop(w, programs, op, plans, refs)
        else:
            w.emit(op)


def _write_loop(w: BodyWriter, programs: Module, op: Op, plans: dict[str, RefPlan], refs: dict[str, str]) -> None:
    body = programs.function(str(op.attr("body")))
    carried = int(op.attr("carried"))
    fn = "_" + identifier(body.name)
    outer_names = w.names
    # Names are per function: the body's scalar constants are its own, and the captured ones.
    outer_consts, inner_consts = w.consts, dict[str, int]()
    inner: dict[str, str] = {}
    inner_refs: dict[str, str] = {}
    for p, v in zip(body.params[1 + carried:], op.operands[carried:]):
        inner[p.name] = w.name(v)  # captured values are the enclosing function's variables
        if v.name in refs:
            inner_refs[p.name] = refs[v.name]
        if v.name in outer_consts:
            inner_consts[p.name] = outer_consts[v.name]
    w.names, w.consts = inner, inner_consts
    index = w.name(body.params[0])
    carry = [w.name(p) for p in body.params[1:1 + carried]]
    w.line(f"def {fn}({index}, carry):")
    w.indent += "    "
    w.line(f"({''.join(f'{c}, ' for c in carry)}) = carry")
    _write(w, programs, body, plans, inner_refs)
    w.line(f"return ({''.join(w.name(r) + ', ' for r in body.returns)})")
    w.indent = w.indent[:-4]
    w.names, w.consts = outer_names, outer_consts
    inits = "".join(w.name(v) + ", " for v in op.operands[:carried])
    results = "".join(w.name(r) + ", " for r in op.results)
    bounds = loop_bounds(op)
    start, stop = (w.index_name(v) for v in bounds) if bounds else ("0", str(op.attr("trips")))
    w.line(f"({results}) = lax.fori_loop({start}, {stop}, {fn}, ({inits}))")


def _atomic_outputs(module: Module, outputs: tuple[Value, ...]) -> list[int]:
    """Positions of the outputs some ``atomic_add`` (or ``arrive``) of the tile program writes."""
    names = {o.operands[0].name for f in module.functions for o in f.ops if o.opcode in ("atomic_add", "arrive")}
    return [j for j, p in enumerate(outputs) if p.name in names]


def generate_source(op: Op, programs: list[Function], ident: str) -> str:
    """The Python source of a kernel body and its ``pallas_call`` wrapper, from its tile program
    (first of ``programs``; the rest are loop bodies)."""
    program = programs[0]
    module = Module(tuple(programs))
    ops = [o for f in programs for o in f.ops]
    plans = plan_refs(module, program)
    n_out = len(op.results)
    # The kernel's own workspace (split-K fixup) are outputs too, zeroed first and dropped after.
    n_scratch = len(scratch_params(op, program))
    n_in = len(program.params) - n_out - n_scratch
    inputs, outputs = program.params[:n_in], program.params[n_in:]
    w = BodyWriter()
    w.used.update(plan.ref for plan in plans.values())
    _write(w, module, program, plans, {p.name: p.name for p in program.params})
    args = [plans[p.name].ref for p in program.params]
    out_shapes = [f"jax.ShapeDtypeStruct({tuple(r.type.shape)}, {jnp_dtype(r)})" for r in outputs]
    grid = KernelTiling.from_attrs(op.attr_dict).launch_grid
    # Outputs the kernel adds into (split-K) start as zeros: an aliased input.
    atomic = _atomic_outputs(module, outputs)
    if atomic:  # the zeros' refs (aliased to the outputs) come between the inputs and the outputs
        args[len(inputs):len(inputs)] = [f"_zeros{j}" for j in atomic]
    # Keywords the wrapper sets from ``interpret``: masked atomics and predicated accesses, PTX (table decodes).
    asm = any(o.opcode == "unpack_pair" and pair_is_table(parse_elem_type(str(o.attr("format")))) for o in ops)
    flags = (["_on_gpu"] if atomic else []) + ([ASM_FLAG] if asm else [])
    lines = [f"def {ident}_body({', '.join(args + [f'{f}=True' for f in flags])}):"]
    lines += ["    " + line for line in w.lines]
    zeros = ", ".join(f"jnp.zeros({tuple(outputs[j].type.shape)}, {jnp_dtype(outputs[j])})" for j in atomic)
    body = f"functools.partial({ident}_body, {', '.join(f'{f}=not interpret' for f in flags)})" if flags \
        else f"{ident}_body"
    in_specs = [plans[p.name].spec for p in inputs] + [plans[outputs[j].name].spec for j in atomic]
    lines += [
        "",
        "",
        f"def {ident}(*args, interpret=False):",
        *([f"    args = (*args, {zeros})"] if atomic else []),
        f"    # kernel {op.attr('callee')}: {op.attr('kind')} over {list(op.attr('space'))}, "
        f"block {list(op.attr('block'))}, grid {list(grid)}",
        "    return pl.pallas_call(",
        f"        {body},",
        f"        grid={grid},",
        "        in_specs=[" + ", ".join(in_specs) + "],",
        "        out_specs=[" + ", ".join(plans[p.name].spec for p in outputs) + "],",
        "        out_shape=[" + ", ".join(out_shapes) + "],",
        *([f"        input_output_aliases={ {len(inputs) + n: j for n, j in enumerate(atomic)} },"] if atomic else []),
        "        interpret=interpret,",
        f"        compiler_params=plgpu.CompilerParams(num_warps={op.attr('num_warps')}, "
        f"num_stages={op.attr('num_stages')}),",
        f"        name={ident!r},  # PTX names allow no dots",
        f"    )(*args){f'[:{n_out}]' if n_scratch else ''}",
    ]
    special = SPECIAL_SOURCE if any(o.opcode in SPECIAL_FUNCTIONS for o in ops) else ""
    return _PRELUDE + special + "\n\n" + "\n".join(lines) + "\n"


def tile_programs(op: Op, module: Module) -> list[Function]:
    """The kernel op's tile program and loop bodies: the ``to-tile`` pass's, or lowered now."""
    if op.attr("tile") is not None:
        program = module.function(str(op.attr("tile")))
        bodies = [module.function(str(o.attr("body"))) for o in program.ops if o.opcode == "loop"]
        return [program, *bodies]
    return lower_kernel(op, module.function(str(op.attr("callee"))), module)


def build_kernel(op: Op, module: Module, interpret: bool, programs: list[Function] | None = None) -> KernelSpec:
    """Generates, compiles (exec) and wraps the kernel called by ``op`` (``programs``: its tile
    programs, when the caller has them)."""
    programs = tile_programs(op, module) if programs is None else programs
    name = str(op.attr("callee"))
    ident = "k_" + identifier(name)
    text = "\n\n".join(print_function(f) for f in programs)
    # The tile program heads the source as a comment: what the code below was generated from.
    source = commented_program(text) + generate_source(op, programs, ident)
    filename = f"<fusec kernel {name}{'' if interpret else ' gpu'}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, Any] = {}
    exec(compile(source, filename, "exec"), namespace)

    gpu_builder = gpu_builder_for(build_kernel, op, module)
    return KernelSpec(name, "pallas", source, text, tuple(v.type for v in op.operands),
                      tuple(r.type for r in op.results), namespace[ident], kernel_reference(op, module), interpret,
                      masked_refs(source, ident), gpu_builder if interpret else None, op=op, module=module,
                      grad_builder=grad_builder_for(build_kernel, op, module, interpret))


def grad_builder_for(build: Callable[..., KernelSpec], op: Op, module: Module, interpret: bool
                     ) -> Callable[[], Any] | None:
    """An attention kernel's ``grad_builder`` (its fused backward, built by ``build``); None for others."""
    if op.attr("kind") != "attention" or len(op.results) != 1:
        return None

    def grad_builder() -> Any:
        from fusec.codegen.attention_grad import attention_grad
        return attention_grad(op, module, interpret, build)

    return grad_builder


def masked_refs(source: str, ident: str) -> tuple[int, ...]:
    """Positions of the kernel's refs (its arguments, in order) that some load or store masks."""
    header = re.search(rf"def {ident}_body\((.*)\):", source)
    assert header is not None
    # The Triton kernel's arguments: the refs, an aliased zeros input (split-K) included.
    names = [n.strip() for n in header.group(1).split(",") if not n.strip().startswith(("_on_gpu", ASM_FLAG))]
    # An access with no mask (a split-K fixup's arrival count: one element, in bounds by construction)
    # does not make its ref a masked one.
    return tuple(i for i, n in enumerate(names)
                 if re.search(rf"plgpu\.(load|store|atomic_add)\({n}\b[^\n]*\bmask=", source))


def kernel_fingerprint(op: Op, module: Module, programs: list[Function]) -> str:
    """The kernel op with its names taken out (its functions renamed by position, values by first
    appearance): two kernel ops with the same fingerprint run the same code on the same types."""
    return canonical_kernel_text(op, [module.function(str(op.attr("callee"))), *programs])


def kernel_ops(module: Module) -> list[Op]:
    return [op for op in module.entry.ops if op.opcode == "kernel"] + [
        op for f in module.functions[1:] for op in f.ops if op.opcode == "kernel"]


KernelCaller = Callable[[KernelSpec, list[Any]], list[Any]]


KernelBuilder = Callable[[Op, Module, bool, list[Function]], KernelSpec]


def module_to_callable(module: Module, interpret: bool, call_kernel: KernelCaller | None = None,
                       make_weak: Callable[[Any], Any] | None = None, builder: KernelBuilder | None = None
                       ) -> tuple[Callable[..., list[Any]], dict[str, KernelSpec]]:
    """The entry function as a callable whose kernel ops run as the kernels ``builder`` makes
    (Pallas kernels by default), and the kernels."""
    builder = builder or build_kernel
    built: dict[str, KernelSpec] = {}
    specs: dict[str, KernelSpec] = {}
    for op in kernel_ops(module):
        # The kernels of repeated layers are one kernel: built once, and one primitive parameter,
        # so JAX lowers it once and calls it from each place.
        programs = tile_programs(op, module)
        fingerprint = kernel_fingerprint(op, module, programs)
        if fingerprint not in built:
            built[fingerprint] = builder(op, module, interpret, programs)
        specs[str(op.attr("callee"))] = built[fingerprint]
    caller = call_kernel or (lambda spec, args: spec.run(*args, interpret=spec.interpret))

    def emit_kernel(op: Op, args: list[Any], ev: Evaluator) -> list[Any]:
        # A low-bit weight is a tuple of arrays (planes, scales, zero-points): the kernel takes each.
        flat = [x for a in args for x in (a if isinstance(a, tuple) else (a,))]
        return list(caller(specs[str(op.attr("callee"))], flat))

    evaluator = Evaluator(module, overrides={"kernel": emit_kernel}, make_weak=make_weak)
    return (lambda *args: evaluator.run(module.entry, args)), specs
