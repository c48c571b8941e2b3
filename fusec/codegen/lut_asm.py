"""PTX that decodes two 4-bit lookup-table codes (NormalFloat nf4, a 16-entry ``lut``) of a word
into one register of two 16-bit floats, by byte permutes (``prmt.b32``): no select chain.

The table's 16 bit patterns are 32 bytes in 8 registers (immediates): the low bytes of entries
0-7, of entries 8-15, then the high bytes likewise. ``prmt.b32 d, a, b, c`` picks each byte of
``d`` from the 8 bytes of ``{b, a}`` by a nibble of ``c`` (its bit 3 would mean sign-replicate,
so code nibbles are masked to 3 bits first). For four codes (a half-word):

1. four permutes look up each code's low and high byte in both half-tables (entries ``c & 7``
   and ``8 + (c & 7)``);
2. two permutes keep, byte by byte, the half-table bit 3 of the code names: selector nibble
   ``i + 4 * bit3(c_i)`` (one shift and one LOP3 make all eight);
3. a permute interleaves low and high bytes into two codes' 16-bit patterns.

Lane ``j`` (0..3) of a word is code ``2j`` in the low half and ``2j + 1`` in the high half
(``unpack_pair``'s adjacent pairing, fusec/ir/tile_ops.py). Each lane is its own asm block with
one result (Pallas's ``elementwise_inline_asm`` lowers only one), written so the four blocks of a
word repeat the same instructions on the same input: ptxas keeps one copy, so a word costs 16
permutes, the mask, a shift and a LOP3 for the selectors and two shifts for the upper half, 21
instructions per 8 weights (tests/test_lut_decode.py counts them in SASS).

Backend-neutral text: the Triton writer passes it to ``tl.inline_asm_elementwise``, the Pallas
writer to ``plgpu.elementwise_inline_asm``; interpreters cannot run PTX and decode by selects.
tests/ptx_emu.py runs this exact text in NumPy.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

# One pair out ($0), the word in ($1) (LLVM inline-asm constraints).
CONSTRAINTS = "=r,r"
_NUMPY_16 = {"bf16": ml_dtypes.bfloat16, "f16": np.float16}
_MAX_16 = {"bf16": 3.3895313892515355e38, "f16": 65504.0}  # the largest finite values


def table_bits16(table: np.ndarray | list[float], dtype: str) -> tuple[int, ...]:
    """The 16-bit patterns of a table's values rounded (to nearest even) to ``dtype`` (bf16 or f16)."""
    if dtype not in _NUMPY_16:
        raise ValueError(f"a 16-bit lookup table is bf16 or f16, not {dtype!r}")
    values = np.asarray(table, np.float64).ravel()
    if values.shape != (16,) or not np.all(np.isfinite(values)):
        raise ValueError(f"a 4-bit lookup table needs 16 finite values, got {values.tolist()}")
    if np.abs(values).max() > _MAX_16[dtype]:  # as fusec/passes/tiling.py's _table_fits
        raise ValueError(f"table values {values.tolist()} overflow {dtype}: they cannot decode in pairs")
    if dtype == "f16":  # NumPy rounds float64 to float16 directly
        return tuple(int(b) for b in values.astype(np.float16).view(np.uint16))
    return tuple(_nearest_bf16(float(v)) for v in values)


def _nearest_bf16(v: float) -> int:
    """The bfloat16 pattern nearest ``v`` (ties to the even pattern), rounding once: float64 to
    float32 to bfloat16 could round twice."""
    near = int(np.asarray(v, np.float32).view(np.uint32)) >> 16
    candidates = [c & 0xFFFF for c in (near - 1, near, near + 1) if 0 <= c <= 0xFFFF]

    def value(c: int) -> float:
        return float(np.asarray(c << 16, np.uint32).view(np.float32))

    finite = [c for c in candidates if np.isfinite(value(c))]
    return min(finite, key=lambda c: (abs(value(c) - v), c & 1))


def table_registers(bits16: tuple[int, ...]) -> tuple[int, ...]:
    """The 8 words ``prmt`` looks bytes up in: low bytes of entries 0-3, 4-7, 8-11, 12-15, then the
    high bytes of the same (byte ``i`` of a word pair ``{b, a}`` is entry ``i`` of its eight)."""
    def word(entries: tuple[int, ...], shift: int) -> int:
        return sum(((e >> shift) & 0xFF) << (8 * i) for i, e in enumerate(entries))

    return tuple(word(bits16[4 * q:4 * q + 4], shift) for shift in (0, 8) for q in range(4))


def lut4_pair_asm(bits16: tuple[int, ...], lane: int) -> str:
    """The PTX decoding codes ``2 lane`` and ``2 lane + 1`` of ``$1`` (a word of eight codes) into
    ``$0`` (their 16-bit patterns, low and high half), ``bits16`` the table's 16 patterns."""
    if lane not in range(4):
        raise ValueError(f"a word of eight 4-bit codes has lanes 0..3, not {lane!r}")
    t = [f"{v:#010x}" for v in table_registers(bits16)]
    lines = [".reg .b32 m, s, la, lb, ha, hb, lo, hi, z, g, t0, t2, t4, t6;",
             # A permute's first data operand must be a register. ptxas keeps a constant there in a
             # uniform register and copies it out for every use (8 copies a word, about one
             # instruction per weight); XORed with lanemask_lt & lanemask_ge, which is 0 in every
             # thread though ptxas cannot tell, the four words are per-thread values it keeps in
             # registers (computed once per loop iteration: identical in every block).
             "mov.u32 z, %lanemask_lt;", "mov.u32 g, %lanemask_ge;", "and.b32 z, z, g;",
             f"xor.b32 t0, z, {t[0]};", f"xor.b32 t2, z, {t[2]};", f"xor.b32 t4, z, {t[4]};",
             f"xor.b32 t6, z, {t[6]};",
             "and.b32 m, $1, 0x77777777;",  # each code's index in its half-table
             "shr.u32 s, $1, 1;",
             # nibble i: i + 4 * bit 3 of code i -- byte i of the half-table the code names
             "lop3.b32 s, s, 0x44444444, 0x32103210, 0xea;"]  # (a & b) | c
    if lane >= 2:  # the upper four codes: prmt reads its selector's low 16 bits
        lines += ["shr.u32 m, m, 16;", "shr.u32 s, s, 16;"]
    lines += [f"prmt.b32 la, t0, {t[1]}, m;", f"prmt.b32 lb, t2, {t[3]}, m;",
              f"prmt.b32 ha, t4, {t[5]}, m;", f"prmt.b32 hb, t6, {t[7]}, m;",
              "prmt.b32 lo, la, lb, s;", "prmt.b32 hi, ha, hb, s;",
              # codes 2 lane, 2 lane + 1: bytes lo0 hi0 lo1 hi1 (or lo2 hi2 lo3 hi3)
              f"prmt.b32 $0, lo, hi, {'0x7362' if lane % 2 else '0x5140'};"]
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
