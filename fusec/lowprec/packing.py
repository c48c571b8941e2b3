"""Bit packing of b-bit codes (b in 1..8) into uint32 words, b bits per code, no straddling.

Layout ("power-of-two planes"): a b-bit code is split into planes of 4, 2 and 1 bits following
b's binary digits, low bits in the widest plane (7 = 4 + 2 + 1, 6 = 4 + 2, 5 = 4 + 1, 3 = 2 + 1;
1, 2, 4 and 8 are one plane). A p-bit plane of a [K, N] code array is a [K * p / 32, N] array of
words: word (r, n) holds the codes of rows 32/p*r .. 32/p*(r+1)-1 in column n, row 32/p*r + j at
bits p*j .. p*j+p-1. No code crosses a word, every word is full, and a kernel unpacks a tile with
one shift and mask per plane: (word >> (p * j)) & (2^p - 1), then ORs the planes together.
K is padded with zero codes to a multiple of 32 (the only storage beyond b bits per code).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusec.ir.types import WORD_BITS, LowBitType


def plane_widths(bits: int) -> tuple[int, ...]:
    """The plane widths for ``bits``, widest (lowest bits) first: 7 -> (4, 2, 1)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bit width must be in 1..8, got {bits}")
    return LowBitType("lut", bits).plane_widths


@dataclass(frozen=True)
class Packed:
    """Packed codes: one uint32 array per plane, and the unpadded shape [K, N, ...]."""

    planes: tuple[np.ndarray, ...]
    bits: int
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.planes)


def pack(codes: np.ndarray, bits: int) -> Packed:
    """Packs integer codes in [0, 2^bits) along axis 0."""
    codes = np.asarray(codes)
    if codes.ndim < 1:
        raise ValueError("codes need at least one axis to pack along")
    if codes.size and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) for {bits} bits")
    k = codes.shape[0]
    padded = -(-k // WORD_BITS) * WORD_BITS
    c = np.zeros((padded, *codes.shape[1:]), np.uint32)
    c[:k] = codes
    planes = []
    shift = 0
    for p in plane_widths(bits):
        per_word = WORD_BITS // p
        part = (c >> np.uint32(shift)) & np.uint32(2**p - 1)
        grouped = part.reshape(padded // per_word, per_word, *codes.shape[1:])
        word = np.zeros((padded // per_word, *codes.shape[1:]), np.uint32)
        for j in range(per_word):
            word |= grouped[:, j] << np.uint32(p * j)
        planes.append(word)
        shift += p
    return Packed(tuple(planes), bits, codes.shape)


def unpack(packed: Packed) -> np.ndarray:
    """The codes again, as uint8, in the original shape."""
    k = packed.shape[0]
    out = None
    shift = 0
    for p, word in zip(plane_widths(packed.bits), packed.planes):
        per_word = WORD_BITS // p
        parts = [(word >> np.uint32(p * j)) & np.uint32(2**p - 1) for j in range(per_word)]
        plane = np.stack(parts, axis=1).reshape(word.shape[0] * per_word, *word.shape[1:])
        out = plane << np.uint32(shift) if out is None else out | (plane << np.uint32(shift))
        shift += p
    assert out is not None
    return out[:k].astype(np.uint8)
