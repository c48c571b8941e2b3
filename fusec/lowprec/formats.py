"""Low-bit number formats as data: every format is a table of 2^bits values (code -> value).

Integers (two's-complement ``int``, or ``uint`` with a zero-point), small floats (e2m1, e2m3,
e3m2, e4m3, e5m2; OCP MX conventions: no infinities except e5m2's, NaN codes never produced),
NormalFloat (nf2..nf8, built from normal quantiles as QLoRA's NF4 is) and user lookup tables.
``decode`` is a table lookup; ``encode`` rounds to the nearest finite table value, ties to the even
code (for floats and integers, IEEE's round-half-to-even). NumPy only: this is the ground truth
kernels are checked against.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from fusec.ir.types import LowBitType

FAMILIES = ("int", "uint", "fp", "nf", "lut")
FLOAT_LAYOUTS = {"e2m1": (2, 1), "e2m3": (2, 3), "e3m2": (3, 2), "e4m3": (4, 3), "e5m2": (5, 2)}


def _float_table(exp_bits: int, man_bits: int) -> np.ndarray:
    """Values of every code of a small float; NaN where the code is not a finite number."""
    bias = 2 ** (exp_bits - 1) - 1
    bits = 1 + exp_bits + man_bits
    values = np.empty(2**bits, np.float64)
    for code in range(2**bits):
        sign = -1.0 if code >> (exp_bits + man_bits) else 1.0
        exponent = (code >> man_bits) & (2**exp_bits - 1)
        mantissa = code & (2**man_bits - 1)
        if exponent == 0:
            value = mantissa / 2**man_bits * 2.0 ** (1 - bias)
        else:
            value = (1 + mantissa / 2**man_bits) * 2.0 ** (exponent - bias)
        values[code] = sign * value
    if (exp_bits, man_bits) == (4, 3):  # E4M3FN: only S.1111.111 is NaN
        values[0x7F] = values[0xFF] = np.nan
    elif (exp_bits, man_bits) == (5, 2):  # IEEE-like: the top exponent is inf/NaN
        top = (2**exp_bits - 1) << man_bits
        for code in range(2**bits):
            if (code & ((2**exp_bits - 1) << man_bits)) == top:
                values[code] = np.nan
    return values


def normal_float_table(bits: int) -> np.ndarray:
    """NormalFloat values for ``bits`` (QLoRA's construction: asymmetric normal quantiles with an
    exact zero, scaled to [-1, 1])."""
    offset = 0.5 * (1 / 32 + 1 / 30)  # QLoRA's 0.9677...: the mean of the 1/32 and 1/30 tails
    offset = 1 - offset
    dist = NormalDist()
    n = 2**bits
    positive = [dist.inv_cdf(p) for p in np.linspace(offset, 0.5, n // 2 + 1)[:-1]]
    negative = [-dist.inv_cdf(p) for p in np.linspace(offset, 0.5, n // 2)[:-1]]
    values = np.sort(np.array(positive + [0.0] + negative))
    return values / np.max(np.abs(values))


@dataclass(frozen=True)
class Format:
    """A low-bit format: ``family``, ``bits``, and for ``lut`` the table itself."""

    family: str
    bits: int
    layout: str | None = None  # the small-float layout ("e2m1", ...) for family "fp"
    lut: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"format family must be one of {FAMILIES}, got {self.family!r}")
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"bit width must be an int in 1..8, got {self.bits!r}")
        if self.family == "fp":
            if self.layout not in FLOAT_LAYOUTS or 1 + sum(FLOAT_LAYOUTS[self.layout]) != self.bits:
                raise ValueError(f"fp formats are {', '.join(FLOAT_LAYOUTS)}; {self.bits} bits with "
                                 f"layout {self.layout!r} is none of them")
        if self.family == "nf" and self.bits < 2:
            raise ValueError("NormalFloat needs at least 2 bits")
        if self.family == "lut":
            if self.lut is None or len(self.lut) != 2**self.bits:
                got = "no table" if self.lut is None else f"{len(self.lut)} values"
                raise ValueError(f"a {self.bits}-bit lookup table needs {2**self.bits} values, got {got}")
            if not all(math.isfinite(v) for v in self.lut):
                raise ValueError("lookup table values must be finite")

    @property
    def table(self) -> np.ndarray:
        """float64 value of every code (NaN for codes that are not finite numbers)."""
        return _table(self)

    @property
    def finite_values(self) -> np.ndarray:
        t = self.table
        return np.unique(t[np.isfinite(t)])

    @property
    def max_abs(self) -> float:
        return float(np.max(np.abs(self.finite_values)))

    @property
    def max_gap(self) -> float:
        """The largest distance between neighbouring values: twice the worst rounding error."""
        v = self.finite_values
        return float(np.max(np.diff(v))) if len(v) > 1 else 0.0

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return self.table[np.asarray(codes, np.int64)]

    def encode(self, values: np.ndarray) -> np.ndarray:
        """The code of the nearest finite value (the even code on ties), as uint8."""
        table = self.table
        order = np.argsort(np.where(np.isfinite(table), table, np.inf), kind="stable")
        order = order[np.isfinite(table[order])]
        sorted_values = table[order]
        v = np.asarray(values, np.float64)
        hi = np.clip(np.searchsorted(sorted_values, v), 1, len(sorted_values) - 1)
        lo = hi - 1
        pick_hi = np.abs(sorted_values[hi] - v) < np.abs(v - sorted_values[lo])
        ties = np.abs(sorted_values[hi] - v) == np.abs(v - sorted_values[lo])
        pick_hi = np.where(ties, order[hi] % 2 == 0, pick_hi)
        return np.where(pick_hi, order[hi], order[lo]).astype(np.uint8)


@functools.cache
def _table(fmt: Format) -> np.ndarray:
    if fmt.family == "int":
        codes = np.arange(2**fmt.bits)
        return np.where(codes >= 2 ** (fmt.bits - 1), codes - 2**fmt.bits, codes).astype(np.float64)
    if fmt.family == "uint":
        return np.arange(2**fmt.bits, dtype=np.float64)
    if fmt.family == "fp":
        return _float_table(*FLOAT_LAYOUTS[fmt.layout])  # type: ignore[index]
    if fmt.family == "nf":
        return normal_float_table(fmt.bits)
    return np.asarray(fmt.lut, np.float64)


def int_format(bits: int, signed: bool = True) -> Format:
    return Format("int" if signed else "uint", bits)


def fp_format(layout: str) -> Format:
    if layout not in FLOAT_LAYOUTS:
        raise ValueError(f"fp formats are {', '.join(FLOAT_LAYOUTS)}; got {layout!r}")
    return Format("fp", 1 + sum(FLOAT_LAYOUTS[layout]), layout)


def format_of(t: LowBitType, lut: tuple[float, ...] | None = None) -> Format:
    """The format behind an IR low-bit element type (``i3g128``, ``e2m1g32``, ``lut4g64`` + table)."""
    family = "fp" if t.family == "float" else t.family
    return Format(family, t.bits, t.base_name if family == "fp" else None, None if lut is None else tuple(lut))


def group_size(t: LowBitType, k: int) -> int:
    """Rows per scale of a low-bit [K, ...] value: its group, or K when it is per channel."""
    return t.rows_per_scale(k)
