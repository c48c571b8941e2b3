"""PTX that decodes one word of eight 4-bit lookup-table codes (NormalFloat nf4, a 16-entry ``lut``)
into four registers of two 16-bit floats each, by byte permutes (``prmt.b32``): no select chain.

The table's 16 bit patterns are 32 bytes in 8 registers (immediates): the low bytes of entries
0-7, of entries 8-15, then the high bytes likewise. ``prmt.b32 d, a, b, c`` picks each byte of
``d`` from the 8 bytes of ``{b, a}`` by a nibble of ``c`` (its bit 3 would mean sign-replicate,
so code nibbles are masked to 3 bits first). Per four codes (a half-word):

1. four permutes look up each code's low and high byte in both half-tables (entries ``c & 7``
   and ``8 + (c & 7)``);
2. two permutes keep, byte by byte, the half-table bit 3 of the code names: selector nibble
   ``i + 4 * bit3(c_i)`` (one shift and one LOP3 make all eight);
3. two permutes interleave low and high bytes into the two codes' 16-bit patterns.

That is 16 permutes, one mask, a shift and a LOP3 for the selectors and two shifts for the upper
half: 21 instructions per 8 weights. Output ``j`` (0..3) holds code ``2j`` in its low half and
code ``2j + 1`` in its high half (``unpack_pair``'s adjacent pairing, fusec/ir/tile_ops.py).

Backend-neutral text: the Triton writer passes it to ``tl.inline_asm_elementwise``, the Pallas
writer to ``plgpu.elementwise_inline_asm``; interpreters cannot run PTX and decode by selects.
tests/ptx_emu.py runs this exact text in NumPy.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

# Pair outputs $0..$3, the word $4 (LLVM inline-asm constraints: four outputs, one input).
CONSTRAINTS = "=r,=r,=r,=r,r"
_NUMPY_16 = {"bf16": ml_dtypes.bfloat16, "f16": np.float16}


def table_bits16(table: np.ndarray | list[float], dtype: str) -> tuple[int, ...]:
    """The 16-bit patterns of a table's values rounded (to nearest even) to ``dtype`` (bf16 or f16)."""
    if dtype not in _NUMPY_16:
        raise ValueError(f"a 16-bit lookup table is bf16 or f16, not {dtype!r}")
    values = np.asarray(table, np.float64)
    if values.shape != (16,) or not np.all(np.isfinite(values)):
        raise ValueError(f"a 4-bit lookup table needs 16 finite values, got {values.shape[0]}")
    return tuple(int(b) for b in values.astype(np.float32).astype(_NUMPY_16[dtype]).view(np.uint16))


def table_registers(bits16: tuple[int, ...]) -> tuple[int, ...]:
    """The 8 words ``prmt`` looks bytes up in: low bytes of entries 0-3, 4-7, 8-11, 12-15, then the
    high bytes of the same (byte ``i`` of a word pair ``{b, a}`` is entry ``i`` of its eight)."""
    def word(entries: tuple[int, ...], shift: int) -> int:
        return sum(((e >> shift) & 0xFF) << (8 * i) for i, e in enumerate(entries))

    return tuple(word(bits16[4 * q:4 * q + 4], shift) for shift in (0, 8) for q in range(4))


def lut4_pair_asm(bits16: tuple[int, ...]) -> str:
    """The PTX decoding ``$4`` (a word of eight codes) into ``$0..$3`` (pairs of 16-bit patterns),
    ``bits16`` the table's 16 patterns."""
    t = [f"{v:#010x}" for v in table_registers(bits16)]
    lines = [".reg .b32 m, s, r, la, lb, ha, hb, lo, hi;",
             "and.b32 m, $4, 0x77777777;",  # each code's index in its half-table
             "shr.u32 s, $4, 1;",
             # nibble i: i + 4 * bit 3 of code i -- byte i of the half-table the code names
             "lop3.b32 s, s, 0x44444444, 0x32103210, 0xea;"]  # (a & b) | c
    for half in range(2):
        if half:  # the upper four codes: prmt reads its selector's low 16 bits
            lines += ["shr.u32 m, m, 16;", "shr.u32 s, s, 16;"]
        lines += [f"prmt.b32 la, {t[0]}, {t[1]}, m;", f"prmt.b32 lb, {t[2]}, {t[3]}, m;",
                  f"prmt.b32 ha, {t[4]}, {t[5]}, m;", f"prmt.b32 hb, {t[6]}, {t[7]}, m;",
                  "prmt.b32 lo, la, lb, s;", "prmt.b32 hi, ha, hb, s;",
                  f"prmt.b32 ${2 * half}, lo, hi, 0x5140;",  # codes 4h, 4h+1: lo0 hi0 lo1 hi1
                  f"prmt.b32 ${2 * half + 1}, lo, hi, 0x7362;"]
    return "{\n" + "\n".join(lines) + "\n}"


def reference_pairs(words: np.ndarray, bits16: tuple[int, ...]) -> np.ndarray:
    """What the PTX computes, from the table directly: [..., 4] uint32, pair ``j`` of each word
    holding code ``2j``'s pattern low and code ``2j + 1``'s high."""
    w = np.asarray(words, np.uint32)[..., None]
    table = np.asarray(bits16, np.uint32)
    j = np.arange(4, dtype=np.uint32)
    lo = table[(w >> (8 * j)) & 0xF]
    hi = table[(w >> (8 * j + 4)) & 0xF]
    return (lo | (hi << 16)).astype(np.uint32)
