"""Value types of the IR: standard JAX dtypes, a parametric low-bit family, and tensor types.

Text forms (also what the parser reads):
- standard dtypes: ``f32 bf16 f16 f64 i8 i16 i32 i64 u8 ... bool c64 c128 f8e4m3fn ...``;
- low-bit formats: ``i3`` / ``u5`` (integers), ``e2m1`` (small floats, 1 + E + M bits), ``nf4``
  (NormalFloat), ``lut4`` (a lookup table of 2^b values), each with an optional group suffix
  ``g128`` (one scale per 128 values along the reduction axis) or ``gc`` (one scale per channel) and
  an optional ``z`` for zero-points and an optional ``p`` for the paired packing order
  (``PACKINGS``): ``i3g128``, ``u4g64z``, ``e2m1g32``, ``nf4gc``, ``i3g128p``;
- a dtype fusec has no name for (PRNG keys, float0) as ``opaque<"key<fry>">``;
- tensors as ``f32[8,1024]``; a scalar is ``f32[]``.

A bare name that is also a standard JAX dtype (``i4``, ``u8``) means the standard dtype.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# fusec name -> NumPy/JAX dtype name.
STANDARD_DTYPES: dict[str, str] = {
    "bool": "bool",
    "i2": "int2", "i4": "int4", "i8": "int8", "i16": "int16", "i32": "int32", "i64": "int64",
    "u2": "uint2", "u4": "uint4", "u8": "uint8", "u16": "uint16", "u32": "uint32", "u64": "uint64",
    "f16": "float16", "bf16": "bfloat16", "f32": "float32", "f64": "float64",
    "c64": "complex64", "c128": "complex128",
    "f8e4m3fn": "float8_e4m3fn", "f8e5m2": "float8_e5m2", "f8e4m3": "float8_e4m3",
    "f8e3m4": "float8_e3m4", "f8e4m3fnuz": "float8_e4m3fnuz", "f8e5m2fnuz": "float8_e5m2fnuz",
    "f8e4m3b11fnuz": "float8_e4m3b11fnuz", "f8e8m0fnu": "float8_e8m0fnu", "f4e2m1fn": "float4_e2m1fn",
}
NUMPY_TO_FUSEC: dict[str, str] = {v: k for k, v in STANDARD_DTYPES.items()}

LOW_BIT_FLOATS: frozenset[tuple[int, int]] = frozenset({(2, 1), (3, 2), (2, 3), (4, 3), (5, 2)})
LOW_BIT_FAMILIES = ("int", "uint", "float", "nf", "lut")
PER_CHANNEL = 0  # the group value that means one scale per output channel
WORD_BITS = 32  # packed low-bit codes live in uint32 words
# How a format's bit planes order their codes (fusec/lowprec/packing.py): "planes", code j of a word
# at lane j; "pairs" (3-bit formats: a 2-bit and a 1-bit plane), the 1-bit plane reordered so that
# a kernel merges it into the 2-bit words once per word and then decodes two 3-bit codes (a pair
# 16 bits apart) per shift and LOP3, as for one plane.
PACKINGS = ("planes", "pairs")


@dataclass(frozen=True)
class DType:
    """A standard JAX dtype, by its fusec name (``f32``)."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in STANDARD_DTYPES:
            raise ValueError(f"unknown standard dtype {self.name!r}")

    @property
    def numpy_name(self) -> str:
        return STANDARD_DTYPES[self.name]

    @property
    def bits(self) -> int:
        """Storage bits per element."""
        if self.name == "bool":
            return 8
        digits = "".join(ch for ch in self.name.split("e")[0] if ch.isdigit())
        return int(digits)

    @property
    def is_float(self) -> bool:
        return self.name.startswith(("f", "bf"))

    @property
    def is_int(self) -> bool:
        return self.name.startswith(("i", "u"))

    @property
    def is_unsigned(self) -> bool:
        return self.name.startswith("u")

    @property
    def is_bool(self) -> bool:
        return self.name == "bool"

    @property
    def is_complex(self) -> bool:
        return self.name.startswith("c")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class LowBitType:
    """A low-bit storage format: ``family`` in int/uint/float/nf/lut, ``bits`` in 1..8.

    ``exp_bits`` is the exponent width of a float format (mantissa = bits - 1 - exp_bits);
    ``group`` is None (no scales), ``PER_CHANNEL`` or a group size; ``zero_point`` marks
    asymmetric formats; ``packing`` is the order codes are stored in (``PACKINGS``).
    """

    family: str
    bits: int
    exp_bits: int | None = None
    group: int | None = None
    zero_point: bool = False
    packing: str = "planes"

    def __post_init__(self) -> None:
        if self.family not in LOW_BIT_FAMILIES:
            raise ValueError(f"low-bit family must be one of {LOW_BIT_FAMILIES}, got {self.family!r}")
        if not 1 <= self.bits <= 8:
            raise ValueError(f"low-bit width must be in 1..8, got {self.bits}")
        if self.family == "float":
            if self.exp_bits is None or (self.exp_bits, self.bits - 1 - self.exp_bits) not in LOW_BIT_FLOATS:
                raise ValueError(f"unsupported small-float layout: {self.bits} bits, exponent {self.exp_bits}")
        elif self.exp_bits is not None:
            raise ValueError("exp_bits applies to the float family only")
        if self.family in ("int", "uint") and self.group is None and not self.zero_point \
                and self.base_name in STANDARD_DTYPES:
            raise ValueError(f"an unscaled {self.base_name} is the standard dtype DType({self.base_name!r})")
        if self.group is not None and self.group < 0:
            raise ValueError(f"group size must be positive (or PER_CHANNEL), got {self.group}")
        if self.packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS}, got {self.packing!r}")
        if self.packing == "pairs" and self.plane_widths != (2, 1):
            raise ValueError(f"the pairs packing is defined for 3-bit codes (a 2-bit and a 1-bit plane), not "
                             f"{self.bits}-bit ones")

    @property
    def base_name(self) -> str:
        if self.family == "int":
            return f"i{self.bits}"
        if self.family == "uint":
            return f"u{self.bits}"
        if self.family == "float":
            assert self.exp_bits is not None
            return f"e{self.exp_bits}m{self.bits - 1 - self.exp_bits}"
        return f"{self.family}{self.bits}"

    @property
    def plane_widths(self) -> tuple[int, ...]:
        """Widths of the bit planes a code is stored in, widest (lowest bits) first: 7 -> (4, 2, 1)."""
        return (8,) if self.bits == 8 else tuple(p for p in (4, 2, 1) if self.bits & p)

    def lane_order(self, plane: int) -> tuple[int, ...]:
        """For the plane at index ``plane`` (of ``plane_widths``): the lane (bit offset / width) of
        each row of its words, row ``t`` at lane ``order[t]``. "planes": ``t``. "pairs", 1-bit
        plane: row t = 16 c + 8 h + 2 i + e (2-bit word c of the 32 rows, pair half h, lane 2 i + e
        of that word) at lane 16 h + 4 i + 2 (1 - c) + e, so that (word c, ORed with the 1-bit
        word shifted left by 2 c) masked by 0x44444444 puts the top bit of each even lane's code
        just above its two low bits (and shifted right by 1, each odd lane's above the 2-bit word
        shifted right by 2): the 3-bit codes of lanes 2 i + e and 2 i + e + 8 at bits 4 i and 4 i + 16."""
        lanes = WORD_BITS // self.plane_widths[plane]
        if self.packing == "planes" or plane == 0:
            return tuple(range(lanes))
        return tuple((0 if t & 16 else 2) | t & 1 | (t & 14) << 1 for t in range(lanes))

    def rows_per_scale(self, k: int) -> int:
        """Rows of a [K, ...] weight sharing one scale: the group, or K when per channel."""
        return k if self.group in (None, PER_CHANNEL) else int(self.group)

    def part_types(self, shape: tuple[int, ...]) -> list[TensorType]:
        """The arrays a [K, N] weight of this format is stored as: one uint32 array per plane
        (K padded to whole words), then scales and zero-points as read by a kernel (float32)."""
        k, n = shape[0], shape[1]
        k_pad = -(-k // WORD_BITS) * WORD_BITS
        planes = [TensorType(DType("u32"), (k_pad * p // WORD_BITS, n)) for p in self.plane_widths]
        groups = k // self.rows_per_scale(k)
        return planes + [TensorType(DType("f32"), (groups, n))] * (1 + int(self.zero_point))

    def __str__(self) -> str:
        text = self.base_name
        if self.group is not None:
            text += "gc" if self.group == PER_CHANNEL else f"g{self.group}"
        return text + ("z" if self.zero_point else "") + ("p" if self.packing == "pairs" else "")


@dataclass(frozen=True)
class ExtType:
    """A dtype fusec passes through without knowing it (PRNG key types, float0)."""

    name: str

    def __str__(self) -> str:
        escaped = self.name.replace("\\", "\\\\").replace('"', '\\"')
        return f'opaque<"{escaped}">'


ElemType = DType | LowBitType | ExtType


@dataclass(frozen=True)
class TensorType:
    """A tensor of ``elem`` values with a static ``shape``."""

    elem: ElemType
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not all(isinstance(d, int) and d >= 0 for d in self.shape):
            raise ValueError(f"tensor dimensions must be non-negative ints, got {self.shape}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def with_shape(self, shape: tuple[int, ...]) -> TensorType:
        return TensorType(self.elem, tuple(shape))

    def with_elem(self, elem: ElemType) -> TensorType:
        return TensorType(elem, self.shape)

    def __str__(self) -> str:
        return f"{self.elem}[{','.join(map(str, self.shape))}]"


_LOW_BIT_RE = re.compile(
    r"^(?:(?P<int>[iu])(?P<ib>[1-8])|e(?P<e>[1-5])m(?P<m>[0-3])|(?P<fam>nf|lut)(?P<fb>[1-8]))"
    r"(?:g(?P<g>c|[1-9][0-9]*))?(?P<z>z)?(?P<p>p)?$"
)


def parse_elem_type(text: str) -> ElemType:
    """Parses an element type name (``f32``, ``i3g128``, ``opaque<"...">``); raises ValueError."""
    if text in STANDARD_DTYPES:
        return DType(text)
    if text.startswith('opaque<"') and text.endswith('">'):
        return ExtType(text[8:-2].replace('\\"', '"').replace("\\\\", "\\"))
    m = _LOW_BIT_RE.match(text)
    if m is None:
        raise ValueError(f"unknown element type {text!r}")
    group = None if m["g"] is None else (PER_CHANNEL if m["g"] == "c" else int(m["g"]))
    zero, packing = m["z"] is not None, "pairs" if m["p"] else "planes"
    if m["int"]:
        family = "int" if m["int"] == "i" else "uint"
        return LowBitType(family, int(m["ib"]), group=group, zero_point=zero, packing=packing)
    if m["e"]:
        e, mant = int(m["e"]), int(m["m"])
        return LowBitType("float", 1 + e + mant, exp_bits=e, group=group, zero_point=zero, packing=packing)
    return LowBitType(m["fam"], int(m["fb"]), group=group, zero_point=zero, packing=packing)


def dtype(name: str) -> DType:
    """The standard dtype called ``name`` (``"f32"``) or with NumPy name ``name`` (``"float32"``)."""
    return DType(NUMPY_TO_FUSEC.get(name, name))


def tensor(elem: str | ElemType, *shape: int) -> TensorType:
    """Shorthand: ``tensor("f32", 8, 16)``."""
    return TensorType(parse_elem_type(elem) if isinstance(elem, str) else elem, tuple(shape))


BOOL = DType("bool")
F32 = DType("f32")
I32 = DType("i32")
