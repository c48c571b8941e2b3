"""A tiny NumPy emulator of the PTX that fusec writes as inline asm (fusec/codegen/lut_asm.py), so
tests run the exact asm text on a CPU: ``{ }`` scopes, ``.reg .b32`` declarations, and the 32-bit
integer instructions ``mov``, ``and``, ``or``, ``xor``, ``shl``, ``shr`` (logical), ``lop3`` and
``prmt`` (default mode, sign replication included), and the special registers ``%laneid``,
``%lanemask_lt`` and ``%lanemask_ge`` (element i runs on lane i % 32, or the lanes given).
Anything else raises, so a new instruction cannot slip past the tests unemulated.
"""

from __future__ import annotations

import re

import numpy as np

_MASK = np.uint64(0xFFFFFFFF)


def _prmt(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``prmt.b32 d, a, b, c`` (default mode): byte i of d is byte ``c[4i+2:4i]`` of the 8 bytes
    ``{b, a}`` (a the low four), or, when ``c[4i+3]`` is set, that byte's sign bit replicated."""
    pool = a.astype(np.uint64) | (b.astype(np.uint64) << np.uint64(32))
    out = np.zeros(np.broadcast(a, b, c).shape, np.uint64)
    for i in range(4):
        nibble = (c.astype(np.uint64) >> np.uint64(4 * i)) & np.uint64(0xF)
        byte = (pool >> (np.uint64(8) * (nibble & np.uint64(7)))) & np.uint64(0xFF)
        sign = np.where((byte >> np.uint64(7)) & np.uint64(1) == 1, np.uint64(0xFF), np.uint64(0))
        out |= np.where(nibble >= 8, sign, byte) << np.uint64(8 * i)
    return out.astype(np.uint32)


def _lop3(a: np.ndarray, b: np.ndarray, c: np.ndarray, lut: int) -> np.ndarray:
    """``lop3.b32 d, a, b, c, lut``: bit k of d is bit (4 a_k + 2 b_k + c_k) of ``lut``."""
    a, b, c = (np.asarray(x, np.uint32) for x in (a, b, c))
    out = np.zeros(np.broadcast(a, b, c).shape, np.uint32)
    for i in range(8):
        if lut >> i & 1:
            out |= (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)
    return out


def _shift(x: np.ndarray, n: np.ndarray, left: bool) -> np.ndarray:
    # PTX clamps shift amounts above 32 to 32 (the result is 0), unlike NumPy.
    wide = x.astype(np.uint64)
    n64 = np.minimum(np.asarray(n, np.uint64), np.uint64(32))
    return (((wide << n64) if left else (wide >> n64)) & _MASK).astype(np.uint32)


_OPS = {
    "mov.b32": lambda a: a,
    "mov.u32": lambda a: a,
    "and.b32": lambda a, b: a & b,
    "or.b32": lambda a, b: a | b,
    "xor.b32": lambda a, b: a ^ b,
    "shl.b32": lambda a, b: _shift(a, b, True),
    "shr.u32": lambda a, b: _shift(a, b, False),
    "shr.b32": lambda a, b: _shift(a, b, False),
    "prmt.b32": _prmt,
}


def run(asm: str, constraints: str, *inputs: np.ndarray, lanes: np.ndarray | None = None) -> list[np.ndarray]:
    """Runs ``asm`` (with LLVM-style ``$n`` operands) elementwise on uint32 ``inputs``: the values
    of its outputs, in order. ``constraints`` is the inline-asm constraint string (``=r`` outputs
    first, then ``r`` inputs), as passed to Triton or Pallas; ``lanes`` each element's lane (0..31)."""
    kinds = constraints.split(",")
    n_out = sum(k.startswith("=") for k in kinds)
    if any(k not in ("=r", "r") for k in kinds) or len(kinds) - n_out != len(inputs):
        raise ValueError(f"constraints {constraints!r} do not fit {len(inputs)} 32-bit inputs")
    shape = np.broadcast(*inputs).shape if inputs else ()
    regs: dict[str, np.ndarray | None] = {f"${n_out + i}": np.broadcast_to(np.asarray(x, np.uint32), shape)
                                          for i, x in enumerate(inputs)}
    regs |= {f"${i}": None for i in range(n_out)}
    lane = (np.arange(int(np.prod(shape)), dtype=np.uint64).reshape(shape) % np.uint64(32) if lanes is None
            else np.broadcast_to(np.asarray(lanes, np.uint64), shape))
    below = (np.uint64(1) << lane) - np.uint64(1)
    regs |= {"%laneid": lane.astype(np.uint32), "%lanemask_lt": below.astype(np.uint32),
             "%lanemask_ge": (~below & _MASK).astype(np.uint32)}

    def value(token: str) -> np.ndarray:
        token = token.strip()
        if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", token):
            number = int(token, 0)
            if number >= 2**32:
                raise ValueError(f"immediate {token} does not fit 32 bits")
            return np.full(shape, number, np.uint32)
        if regs.get(token) is None:
            raise ValueError(f"register {token} is read before it is written")
        return regs[token]  # type: ignore[return-value]

    text = asm.replace("{", ";").replace("}", ";")
    for statement in (s.strip() for s in text.split(";")):
        if not statement:
            continue
        if statement.startswith(".reg .b32 "):
            for name in statement.removeprefix(".reg .b32 ").split(","):
                regs[name.strip()] = None
            continue
        opcode, _, rest = statement.partition(" ")
        operands = [o.strip() for o in rest.split(",")]
        dest = operands[0]
        if dest not in regs or dest.startswith("%") or dest.startswith("$") and int(dest[1:]) >= n_out:
            raise ValueError(f"{statement!r} writes {dest}, not a declared register or an output")
        if opcode == "lop3.b32":
            a, b, c = (value(o) for o in operands[1:4])
            regs[dest] = _lop3(a, b, c, int(operands[4], 0))
        elif opcode in _OPS:
            regs[dest] = np.asarray(_OPS[opcode](*(value(o) for o in operands[1:])), np.uint32)
        else:
            raise ValueError(f"the emulator has no instruction {opcode!r} ({statement!r})")
    outs = [regs[f"${i}"] for i in range(n_out)]
    if any(o is None for o in outs):
        raise ValueError("the asm leaves an output unwritten")
    return outs  # type: ignore[return-value]
