"""A kernel op's tile program as a ``@triton.jit`` kernel: :class:`TritonKernel`.

The kernel takes one pointer per array (inputs, then outputs); arrays are dense row-major, so an
access's addresses are ``base + sum(offset_d * stride_d)`` with ``offset_d = index_d * block_d +
arange(block_d)`` (a squeezed dimension adds its scalar offset). Every dimension the tile program
marks ``masked`` is masked (``offset_d < size_d``, loads reading ``other``), and no other: to-tile
found those by the same interval arithmetic the tile verifier proves bounds with. The K loop is a
``for`` over ``range(trips)`` with the carried accumulators reassigned each trip.
"""

from __future__ import annotations

from fusec.codegen.pallas_refs import identifier
from fusec.codegen.triton.body import BodyWriter, expand
from fusec.codegen.triton.kernel import INTERPRETED_FLAG, ArraySig, TritonKernel
from fusec.codegen.triton.text import constant_value, pow2, shape_text
from fusec.errors import Unsupported
from fusec.ir import Function, KernelTiling, Module, Op, print_function
from fusec.ir.tile_ops import ACCESS_OPS, access_indices, access_predicate, loop_bounds, scratch_params

_PRELUDE = f"""import triton
import triton.language as tl
from triton.language.extra import libdevice

{INTERPRETED_FLAG}
"""
_HELPERS = {"_fusec_mul": "@triton.jit\ndef _fusec_mul(a, b):\n    return a * b\n",
            # The interpreter has no 16-bit float matmul: its operands widen to float32 there (TF32
            # holds them exactly); a GPU's tensor cores take them as they are, at twice the rate.
            "_fusec_dot_operand": "@triton.jit\ndef _fusec_dot_operand(x):\n    if FUSEC_INTERPRETED:\n"
                                  "        return x.to(tl.float32)\n    return x\n"}
_INT32_MAX = 2**31 - 1


def _strides(shape: tuple[int, ...]) -> list[int]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return strides[::-1]


def _access(w: BodyWriter, op: Op, ref: str, n_values: int) -> tuple[str, str]:
    """The pointer tile of ``op``'s block and its mask (``""`` when no dimension is masked)."""
    array = op.operands[0].type
    block = list(op.attr("block"))
    squeeze = set(op.attr("squeeze", ()))
    masked = set(op.attr("masked", ()))
    indices = [w.index(v) for v in access_indices(op)]
    kept = [d for d in range(array.rank) if d not in squeeze]
    rank = len(kept)
    tag = w.name(op.results[0]) if op.results else ref
    terms, masks = [], []
    for d, (stride, size, b, index) in enumerate(zip(_strides(array.shape), array.shape, block, indices)):
        start = "0" if index == "0" else f"{index} * {b}"
        if d in squeeze:
            terms.append(f"{start} * {stride}" if stride != 1 else start)
            continue
        if not pow2(b):
            raise Unsupported(f"block {block} of {ref} is not a power of two in dimension {d}")
        offset = w.fresh(f"{tag}_o{d}")
        w.line(f"{offset} = {'' if start == '0' else start + ' + '}tl.arange(0, {b})")
        along = expand(offset, rank, [kept.index(d)])
        terms.append(f"{along} * {stride}" if stride != 1 else along)
        if d in masked:
            masks.append(f"({along} < {size})")
    when = access_predicate(op)
    if when is not None:  # a [1, ..., 1] tile: the interpreter masks with tiles, not scalars
        masks.append(f"(tl.full({(1,) * rank}, 0, tl.int32) + {w.name(when)}.to(tl.int32) != 0)")
    return (f"{ref} + {' + '.join(terms)}" if terms else ref), " & ".join(masks)  # a 0-d array: its pointer


def _write_access(w: BodyWriter, op: Op, ref: str) -> None:
    if op.opcode == "load":
        ptr, mask = _access(w, op, ref, 1)
        tile = op.result.type
        extra = ""
        if mask:
            other = op.attr("other") or 0
            fill = "0" if other == 0 else constant_value(other, tile)
            extra = f", mask={mask}, other={fill}"
        # A low-bit weight's scales are declared f32: read as f32, whatever dtype stores them.
        cast = ".to(tl.float32)" if str(tile.elem) == "f32" else ""
        w.line(f"{w.name(op.result)} = tl.load({ptr}{extra}){cast}  # {op.result.name}: {tile}")
        return
    ptr, mask = _access(w, op, ref, 2)
    fn = "tl.store" if op.opcode == "store" else "tl.atomic_add"
    # Partial sums a fixup reads back after the barrier and the arrival's release need no ordering
    # of their own (no fence per add: "red" instructions).
    sem = ", sem='relaxed'" if op.opcode == "atomic_add" and op.attr("relaxed") else ""
    w.line(f"{fn}({ptr}, {w.name(op.operands[1])}{f', mask={mask}' if mask else ''}{sem})")


def _write(w: BodyWriter, programs: Module, func: Function, refs: dict[str, str]) -> None:
    """Writes ``func``'s ops; ``refs`` maps its array parameters to the kernel's pointer names."""
    for op in func.ops:
        if op.opcode in ACCESS_OPS:
            _write_access(w, op, refs[op.operands[0].name])
        elif op.opcode == "barrier":
            w.line("tl.debug_barrier()")
        elif op.opcode == "arrive":  # one thread's atomic; Triton broadcasts the old count
            w.line(f"{w.name(op.result)} = tl.atomic_add({refs[op.operands[0].name]} + {w.index(op.operands[1])}, 1, "
                   f"sem='acq_rel')  # {op.result.name}: the count before this program's arrival")
        elif op.opcode == "loop":
            _write_loop(w, programs, op, refs)
        else:
            w.emit(op)


def _write_loop(w: BodyWriter, programs: Module, op: Op, refs: dict[str, str]) -> None:
    body = programs.function(str(op.attr("body")))
    carried = int(op.attr("carried"))
    outer = w.names
    # Names are per function: the body's scalar constants are its own, and the captured ones.
    outer_consts, inner_consts = w.consts, dict[str, int]()
    inner: dict[str, str] = {}
    inner_refs: dict[str, str] = {}
    carry = []
    for p, v in zip(body.params[1:1 + carried], op.operands[:carried]):
        ident = w.name(p)
        carry.append(ident)
        w.line(f"{ident} = {w.index(v)}")
    for p, v in zip(body.params[1 + carried:], op.operands[carried:]):
        inner[p.name] = w.name(v)  # captured values are the enclosing function's variables
        if v.name in refs:
            inner_refs[p.name] = refs[v.name]
        if v.name in outer_consts:
            inner_consts[p.name] = outer_consts[v.name]
    for p, ident in zip(body.params[1:1 + carried], carry):
        inner[p.name] = ident
    bounds = loop_bounds(op)  # the enclosing function's values
    span = f"{w.index(bounds[0])}, {w.index(bounds[1])}" if bounds else str(int(op.attr("trips")))
    w.names, w.consts = inner, inner_consts
    index = w.name(body.params[0])
    w.line(f"for {index} in range({span}):")
    w.indent += "    "
    _write(w, programs, body, inner_refs)
    returns = [w.name(r) for r in body.returns]
    if carry:
        w.line(f"{', '.join(carry)} = {', '.join(returns)}")
    else:
        w.line("pass")
    w.indent = w.indent[:-4]
    w.names, w.consts = outer, outer_consts
    for r, ident in zip(op.results, carry):
        w.line(f"{w.name(r)} = {ident}")


def generate_kernel(op: Op, programs: list[Function], ident: str) -> TritonKernel:
    """The Triton kernel of a kernel op from its tile program (first of ``programs``; the rest
    are loop bodies). Raises ``Unsupported`` for what Triton source cannot express here."""
    program = programs[0]
    module = Module(tuple(programs))
    n_out = len(op.results)
    params = program.params
    for p in params:
        if p.type.size > _INT32_MAX:
            raise Unsupported(f"array %{p.name} ({p.type}) is too large for the Triton backend's int32 offsets")
    grid = KernelTiling.from_attrs(op.attr_dict).launch_grid
    w = BodyWriter(grid=grid)
    refs = {p.name: "p_" + identifier(p.name) for p in params}
    w.used.update(refs.values())
    _write(w, module, program, refs)
    atomic = {o.operands[0].name for f in programs for o in f.ops if o.opcode in ("atomic_add", "arrive")}
    # The kernel's own workspace (split-K fixup) are outputs too, zeroed first and dropped after.
    n_scratch = len(scratch_params(op, program))
    outputs = params[len(params) - n_out - n_scratch:]
    launch = grid if len(grid) <= 3 else (_product(grid),)
    header = [f"# kernel {op.attr('callee')}: {op.attr('kind')} over {list(op.attr('space'))}, "
              f"block {list(op.attr('block'))}, grid {list(grid)}",
              "@triton.jit", f"def {ident}({', '.join(refs[p.name] for p in params)}):"]
    if not w.lines:
        w.line("pass")
    helpers = "".join("\n\n" + _HELPERS[h] for h in sorted(w.helpers))
    source = _PRELUDE + helpers + "\n\n" + "\n".join(header + w.lines) + "\n"
    sig = lambda p: ArraySig(tuple(p.type.shape), p.type.elem.numpy_name)  # type: ignore[union-attr]  # noqa: E731
    return TritonKernel(ident, source, tuple(launch), tuple(sig(p) for p in params[:len(params) - len(outputs)]),
                        tuple(sig(p) for p in outputs), (), int(op.attr("num_warps") or 4),
                        int(op.attr("num_stages") or 2),
                        tuple(j for j, p in enumerate(outputs) if p.name in atomic), n_scratch)


def _product(xs: tuple[int, ...]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def kernel_text(programs: list[Function]) -> str:
    """The tile program (and loop bodies) as IR text."""
    return "\n\n".join(print_function(f) for f in programs)


__all__ = ["generate_kernel", "kernel_text", "shape_text"]
