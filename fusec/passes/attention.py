"""``recognize-attention``: each softmax(f(Q K^T)) V (see :mod:`fusec.passes.attention_match`)
becomes one ``kernel`` op of kind ``"attention"``.

Its callee is the pattern's own ops (so the reference, and autodiff through it, compute exactly
what the user wrote); its operands are the QK dot's operands, V and the side inputs (a padding
mask, a bias), never the [Tq, Tk] scores, which the kernel recomputes block by block
(``to-tile``: a FlashAttention-2 forward). Causal masks built from iotas are recomputed in the
kernel from element indices. The ops the kernel replaces are left to ``dce``; what does not match
is left untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

from fusec.ir import Function, Module, Op
from fusec.passes.attention_band import attention_band, visited_blocks
from fusec.passes.attention_match import AttentionMatch, find_attentions
from fusec.passes.base import Pass, register_pass
from fusec.passes.cost import nbytes
from fusec.passes.rewrite import fresh_name
from fusec.passes.tiling import attention_tiling


def attention_kernel(m: AttentionMatch, name: str) -> tuple[Op, Function]:
    """The kernel op replacing ``m``'s PV dot, and its callee."""
    params = []
    for operand in (m.q, m.k, m.v, *m.inputs):
        if operand.value.name not in {p.name for p in params}:
            params.append(operand.value)
    callee = Function(name, tuple(params), tuple(m.ops), (m.out.value,))
    # Causal block skipping: only the key blocks in the band are computed (counted at GPU blocks).
    gpu = attention_tiling((m.batch, m.tq, m.value_dim), m.tk, "gpu")
    bq, bk = gpu.block[1], int(gpu.bk or 1)
    visited = visited_blocks(attention_band(callee, m), m.tq, m.tk, bq, bk)
    total = -(-m.tq // bq) * -(-m.tk // bk)
    flops = 2 * m.batch * m.tq * m.tk * (m.head_dim + m.value_dim) * visited // total
    kernel = Op.make("kernel", params, [m.out.value], callee=name, kind="attention",
                     space=(m.batch, m.tq, m.value_dim), bytes_read=sum(nbytes(p.type) for p in params),
                     bytes_written=nbytes(m.out.value.type), flops=flops, **m.attrs)
    return Op(kernel.opcode, kernel.operands, kernel.results, kernel.attrs, m.pv.loc), callee


@register_pass
@dataclass(frozen=True)
class RecognizeAttention(Pass):
    """Replaces every recognised attention by an attention kernel op (before ``fuse``)."""

    name = "recognize-attention"

    def run(self, module: Module) -> Module:
        names = {f.name for f in module.functions}
        callees = {str(op.attr("callee")) for op in module.all_ops() if op.opcode == "kernel"}
        out, added = [], []
        for func in module.functions:
            found = [] if func.name in callees else find_attentions(func)
            if not found:
                out.append(func)
                continue
            replace: dict[int, Op | None] = {}
            for m in found:
                kernel, callee = attention_kernel(m, fresh_name(f"{func.name}.attn", names))
                # The kernel writes the last of the PV dot's layout ops' results, in its place.
                replace.update({id(op): None for op in (m.pv, *m.tail)})
                replace[id((m.tail or [m.pv])[-1])] = kernel
                added.append(callee)
            ops = tuple(new for op in func.ops if (new := replace.get(id(op), op)) is not None)
            out.append(Function(func.name, func.params, ops, func.returns))
        return module.replace_functions(out + added)
