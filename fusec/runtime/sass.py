"""Reading SASS text (``nvdisasm -c`` output) and ``cuobjdump -res-usage`` reports.

Pure text parsing, no JAX and no tools: :func:`parse_sass` splits a listing into functions and
instructions, :func:`hot_loop` finds the largest backward branch, :func:`mix` counts what the GPU
will execute by kind (global loads with their widths, shared memory, MMA, FP32 math, conversions,
integer bit ops, barriers, branches). :mod:`fusec.runtime.gpu_compile` produces the text.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:(@!?U?P(?:T|\d)|@!?UPT)\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)"
                    r"\s*(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_[\w]+):")
_FUNC = re.compile(r"^//-+ \.text\.([\w$.]+)\s+-+")
_TARGET = re.compile(r"`\((\.L_[\w]+)\)")

# Opcode (the part before the first dot) -> category. Anything else is "other".
CATEGORIES: dict[str, frozenset[str]] = {
    "global_load": frozenset({"LDG", "LDGSTS", "UTMALDG", "UBLKCP"}),
    "global_store": frozenset({"STG", "UTMASTG", "RED", "ATOMG"}),
    "shared_load": frozenset({"LDS", "LDSM"}),
    "shared_store": frozenset({"STS", "STSM"}),
    "local": frozenset({"LDL", "STL"}),
    "mma": frozenset({"HMMA", "IMMA", "HGMMA", "IGMMA", "QGMMA", "QMMA", "DMMA", "BMMA"}),
    "fp32": frozenset({"FFMA", "FMUL", "FADD", "FMNMX", "FSETP", "FSEL", "FCHK", "MUFU"}),
    "fp16x2": frozenset({"HFMA2", "HMUL2", "HADD2", "HMNMX2", "HSETP2"}),
    "conversion": frozenset({"I2F", "F2F", "F2I", "I2FP", "F2FP", "I2I", "I2IP", "F2IP", "FRND"}),
    "int_bits": frozenset({"LOP3", "PRMT", "SHF", "SGXT", "BMSK", "BREV", "FLO", "POPC", "LOP", "SHL", "SHR"}),
    "int_arith": frozenset({"IADD3", "IMAD", "LEA", "VIADD", "ISETP", "SEL", "IMNMX", "IABS", "VIMNMX", "IDP"}),
    "barrier": frozenset({"BAR", "DEPBAR", "LDGDEPBAR", "SYNCS", "MEMBAR", "WARPSYNC", "ARRIVES"}),
    "branch": frozenset({"BRA", "EXIT", "BSSY", "BSYNC", "JMP", "RET", "CALL", "BRX", "JMX"}),
}
_CATEGORY = {op: cat for cat, ops in CATEGORIES.items() for op in ops}
# Conversions that run on the shared conversion unit at 16 results per clock per SM (see gpu_model).
SLOW_CONVERSIONS = frozenset({"I2F", "F2F", "F2I", "I2I"})
_WIDTH = {"128": 16, "64": 8, "32": 4, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with modifiers, e.g. "LDG.E.128"
    operands: str
    predicate: str | None = None
    target: str | None = None  # a branch's label

    @property
    def base(self) -> str:
        """The opcode without modifiers: ``LDG.E.128`` -> ``LDG``."""
        return self.opcode.split(".")[0]

    @property
    def category(self) -> str:
        base = self.base
        if base in _CATEGORY:
            return _CATEGORY[base]
        return "uniform" if base.startswith("U") else "other"

    @property
    def width_bytes(self) -> int:
        """Bytes one thread moves, for global/shared loads and stores (4 when no width is written)."""
        for mod in self.opcode.split(".")[1:]:
            if mod in _WIDTH:
                return _WIDTH[mod]
        return 4


@dataclass(frozen=True)
class SassFunction:
    name: str
    instructions: tuple[Instruction, ...]
    labels: dict[str, int] = field(default_factory=dict)  # label -> address

    def executable(self) -> tuple[Instruction, ...]:
        """The instructions without the padding after the last ``EXIT``: the ``BRA`` to itself that
        ends every kernel, and ``NOP`` fill."""
        out = list(self.instructions)
        while out and (out[-1].base == "NOP" or (out[-1].base == "BRA" and self.labels.get(out[-1].target or "")
                                                  == out[-1].address)):
            out.pop()
        return tuple(out)


@dataclass(frozen=True)
class Loop:
    start: int  # address of the first instruction of the body (the branch target)
    end: int  # address of the backward branch
    instructions: tuple[Instruction, ...]

    def __len__(self) -> int:
        return len(self.instructions)


def parse_sass(text: str) -> list[SassFunction]:
    """The functions in an ``nvdisasm -c`` listing, in order."""
    funcs: list[SassFunction] = []
    name: str | None = None
    instrs: list[Instruction] = []
    labels: dict[str, int] = {}
    pending: list[str] = []

    def close() -> None:
        if name is not None:
            funcs.append(SassFunction(name, tuple(instrs), dict(labels)))

    for line in text.splitlines():
        head = _FUNC.match(line)
        if head:
            close()
            name, instrs, labels, pending = head.group(1), [], {}, []
            continue
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        if name is None:
            name = "function"
        address = int(m.group(1), 16)
        for lab in pending:
            labels[lab] = address
        pending = []
        target = _TARGET.search(m.group(4))
        instrs.append(Instruction(address, m.group(3), m.group(4), m.group(2), target.group(1) if target else None))
    close()
    return funcs


def loops(func: SassFunction) -> list[Loop]:
    """Every backward branch (a branch to an earlier or the same address, not to itself), as the
    loop from its target to it."""
    out = []
    for ins in func.executable():
        if ins.base != "BRA" or ins.target not in func.labels:
            continue
        start = func.labels[ins.target]
        if start < ins.address:
            body = tuple(i for i in func.instructions if start <= i.address <= ins.address)
            out.append(Loop(start, ins.address, body))
    return out


def hot_loop(func: SassFunction) -> Loop | None:
    """The loop with the most instructions (the outermost of nested loops), or None."""
    found = loops(func)
    return max(found, key=len) if found else None


@dataclass(frozen=True)
class Mix:
    """Counts of warp-level instructions in a stretch of SASS."""

    total: int
    by_category: dict[str, int]
    by_opcode: dict[str, int]  # base opcode -> count
    global_load_bytes: int  # bytes per thread, summed over the global loads
    async_load_bytes: int  # of those, copies to shared memory (LDGSTS, cp.async)
    global_store_bytes: int
    global_load_widths: tuple[int, ...]  # distinct widths in bytes, widest first
    slow_conversions: int  # I2F, F2F, F2I, I2I: the 16-per-clock conversion unit
    mma: tuple[str, ...]  # each MMA instruction's opcode with modifiers

    @property
    def conversions(self) -> int:
        return self.by_category.get("conversion", 0)

    def count(self, category: str) -> int:
        return self.by_category.get(category, 0)


def mix(instructions: tuple[Instruction, ...] | list[Instruction]) -> Mix:
    """Counts by category and opcode, load and store bytes per thread, conversions and MMAs."""
    by_cat = Counter(i.category for i in instructions)
    by_op = Counter(i.base for i in instructions)
    loads = [i for i in instructions if i.category == "global_load" and i.base in ("LDG", "LDGSTS")]
    stores = [i for i in instructions if i.category == "global_store" and i.base == "STG"]
    return Mix(len(instructions), dict(by_cat), dict(by_op),
               sum(i.width_bytes for i in loads), sum(i.width_bytes for i in loads if i.base == "LDGSTS"),
               sum(i.width_bytes for i in stores), tuple(sorted({i.width_bytes for i in loads}, reverse=True)),
               sum(i.base in SLOW_CONVERSIONS for i in instructions),
               tuple(i.opcode for i in instructions if i.category == "mma"))


@dataclass(frozen=True)
class ResourceUsage:
    """One function's line of ``cuobjdump -res-usage``."""

    registers: int
    stack: int
    shared: int  # static shared memory, bytes
    local: int  # local memory per thread, bytes (spills and stack arrays)


def parse_resource_usage(text: str) -> dict[str, ResourceUsage]:
    """``cuobjdump -res-usage`` output -> {function name: usage}."""
    out = {}
    for m in re.finditer(r"Function ([\w$.]+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text):
        out[m.group(1)] = ResourceUsage(int(m.group(2)), int(m.group(3)), int(m.group(4)), int(m.group(5)))
    return out


_MMA_SHAPE = re.compile(r"^(\d{2})(\d)(\d+)$")  # HMMA.16816 -> m16 n8 k16


def mma_flops(opcode: str) -> int:
    """FLOPs (or integer ops) one warp-level ``HMMA``/``IMMA`` instruction performs (2*m*n*k), from
    its shape modifier; 0 for shapes not written that way (``HGMMA``'s are in its operands)."""
    parts = opcode.split(".")
    if len(parts) > 1:
        m = _MMA_SHAPE.match(parts[1])
        if m:
            return 2 * int(m.group(1)) * int(m.group(2)) * int(m.group(3))
    return 0



def _returns_value(ins: Instruction) -> bool:
    """Whether an ``ATOM``/``ATOMG`` writes its old value to a register (``ATOMG... PT, R3, [..]``)
    rather than discarding it (``PT, RZ``)."""
    ops = [o.strip() for o in ins.operands.split(",")]
    dest = ops[1] if len(ops) > 1 and ops[0].startswith(("P", "!P")) else ops[0]
    return dest != "RZ"


def tail_round_trips(instructions: tuple[Instruction, ...] | list[Instruction]) -> int:
    """Serial memory round trips in a stretch of SASS after a kernel's stream (its hot loop): each
    GPU-scope ``MEMBAR`` that follows an outstanding global write or atomic waits for it to be
    performed; each atomic that returns its old value waits for it; and a global load after such
    an atomic (a reload the atomic guards) waits once more."""
    trips, outstanding, guarded = 0, False, False
    for ins in instructions:
        atomic = ins.base in ("ATOM", "ATOMG")
        if ins.base in ("STG", "RED", "REDG") or (atomic and not _returns_value(ins)):
            outstanding = True
        elif atomic:
            trips += 1
            guarded, outstanding = True, False
        elif ins.base == "MEMBAR" and set(ins.opcode.split(".")[1:]) & {"GPU", "SYS"}:
            trips += int(outstanding)
            outstanding = False
        elif ins.base in ("LDG", "LD") and guarded:
            trips += 1
            guarded = False
    return trips
