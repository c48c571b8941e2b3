"""Bit packing of b-bit codes (b in 1..8) into uint32 words, b bits per code, no straddling.

Layout ("power-of-two planes"): a b-bit code is split into planes of 4, 2 and 1 bits following
b's binary digits, low bits in the widest plane (7 = 4 + 2 + 1, 6 = 4 + 2, 5 = 4 + 1, 3 = 2 + 1;
1, 2, 4 and 8 are one plane). A p-bit plane of a [K, N] code array is a [K * p / 32, N] array of
words: word (r, n) holds the codes of rows 32/p*r .. 32/p*(r+1)-1 in column n, row 32/p*r + j at
bits p*j .. p*j+p-1. No code crosses a word, every word is full, and a kernel unpacks a tile with
one shift and mask per plane: (word >> (p * j)) & (2^p - 1), then ORs the planes together.
K is padded with zero codes to a multiple of 32 (the only storage beyond b bits per code).

Packing "pairs" (``fusec.ir.types.PACKINGS``; the default for 3 bits, see :func:`default_packing`)
keeps the widest plane as is and reorders the rows of each narrower plane's word
(``LowBitType.lane_order``): a paired kernel decodes rows t and t + L/2 of a widest-plane word (L =
32 / its width) from one shifted word, 16 bits apart, and needs their bits of every other plane 16
bits apart too. For 3 bits (2 + 1), the 1-bit word holds rows 0..7, 16..23, 8..15, 24..31 (bits 3
and 4 of the row swapped), so rows j and j + 8 of each 2-bit word sit at bits i and i + 16.
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


def default_packing(bits: int) -> str:
    """The packing ``quantize`` stores ``bits``-bit codes in: "pairs" for 3 bits (the paired GEMV
    decodes it two codes per operation), "planes" otherwise (one plane, or no paired kernel yet)."""
    return "pairs" if bits == 3 else "planes"


def lane_orders(bits: int, packing: str = "planes") -> list[tuple[int, ...]]:
    """Per plane, the lane of each row of its words (``LowBitType.lane_order``)."""
    plane_widths(bits)
    t = LowBitType("lut", bits, packing=packing)
    return [t.lane_order(i) for i in range(len(t.plane_widths))]


@dataclass(frozen=True)
class Packed:
    """Packed codes: one uint32 array per plane, the unpadded shape [K, N, ...], the packing."""

    planes: tuple[np.ndarray, ...]
    bits: int
    shape: tuple[int, ...]
    packing: str = "planes"

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.planes)


def pack(codes: np.ndarray, bits: int, packing: str = "planes") -> Packed:
    """Packs integer codes in [0, 2^bits) along axis 0, in the order ``packing`` names."""
    orders = lane_orders(bits, packing)
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
    for p, order in zip(plane_widths(bits), orders):
        per_word = WORD_BITS // p
        part = (c >> np.uint32(shift)) & np.uint32(2**p - 1)
        grouped = part.reshape(padded // per_word, per_word, *codes.shape[1:])
        word = np.zeros((padded // per_word, *codes.shape[1:]), np.uint32)
        for t in range(per_word):
            word |= grouped[:, t] << np.uint32(p * order[t])
        planes.append(word)
        shift += p
    return Packed(tuple(planes), bits, codes.shape, packing)


def unpack(packed: Packed) -> np.ndarray:
    """The codes again, as uint8, in the original shape."""
    k = packed.shape[0]
    out = None
    shift = 0
    orders = lane_orders(packed.bits, packed.packing)
    for p, word, order in zip(plane_widths(packed.bits), packed.planes, orders):
        per_word = WORD_BITS // p
        parts = [(word >> np.uint32(p * order[t])) & np.uint32(2**p - 1) for t in range(per_word)]
        plane = np.stack(parts, axis=1).reshape(word.shape[0] * per_word, *word.shape[1:])
        out = plane << np.uint32(shift) if out is None else out | (plane << np.uint32(shift))
        shift += p
    assert out is not None
    return out[:k].astype(np.uint8)
