"""Reading Triton IR (TTIR) text: which kernel argument each load and store touches, and whether it
is masked. This is how fusec checks, on any machine, that the GPU code of a kernel stays inside its
arrays (see :func:`fusec.runtime.jax_internals.triton_kernels_in` for getting the TTIR)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_DEF = re.compile(r"^\s*(%[\w.]+)(?::\d+)? = ([\w.]+) (.*)$")
_ACCESS = re.compile(r"^\s*(?:(%[\w.]+) = )?(tt\.load|tt\.store|tt\.atomic_rmw) (.*)$")
# Ops through which a pointer keeps pointing into the same argument; the pointer is operand 0.
_POINTER_OPS = frozenset({"tt.addptr", "tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape",
                          "tt.trans", "tt.bitcast", "ttg.convert_layout"})


@dataclass(frozen=True)
class MemoryAccess:
    """One ``tt.load`` or ``tt.store``: the kernel argument its pointer comes from (None when it
    cannot be traced to one) and whether it carries a mask."""

    kind: str  # "load" or "store"
    argument: int | None
    masked: bool
    line: str


def _operands(rest: str) -> list[str]:
    head = rest.split(" : ")[0].split(" {")[0]
    return [o.strip() for o in head.split(",") if o.strip()]


def memory_accesses(ttir: str) -> list[MemoryAccess]:
    """Every load and store in one kernel's TTIR, with the argument it touches."""
    match = re.search(r"tt\.func (?:public )?@[\w$.]+\((.*?)\)\s*(?:attributes|\{)", ttir)
    n_args = len(re.findall(r"%arg\d+:", match.group(1))) if match else 0
    defs: dict[str, tuple[str, list[str]]] = {}
    for line in ttir.splitlines():
        m = _DEF.match(line)
        if m:
            defs[m.group(1)] = (m.group(2), _operands(m.group(3)))

    def argument(value: str) -> int | None:
        for _ in range(64):
            arg = re.fullmatch(r"%arg(\d+)", value)
            if arg:
                return int(arg.group(1)) if int(arg.group(1)) < n_args else None
            opcode, operands = defs.get(value, ("", []))
            if opcode not in _POINTER_OPS or not operands:
                return None
            value = operands[0]
        return None

    out = []
    for line in ttir.splitlines():
        m = _ACCESS.match(line)
        if not m:
            continue
        kind = m.group(2).removeprefix("tt.")
        operands = _operands(m.group(3))
        if kind == "atomic_rmw":  # "fadd, acq_rel, gpu, ptr, value[, mask]": a read-modify-write
            kind, operands = "store", operands[3:]
        masked = len(operands) >= (2 if kind == "load" else 3)
        out.append(MemoryAccess(kind, argument(operands[0]), masked, line.strip()))
    return out
