"""The tile-level op vocabulary: what one program instance of a kernel does.

A tile program is an IR function whose parameters are the kernel's arrays (inputs, then outputs)
and which returns nothing. Its values are tiles (small power-of-two tensors held in registers) and
``i32[]`` scalars (program ids, loop indices and block indices computed from them with ordinary
scalar ops). Elementwise ops, ``broadcast``, ``reduce``, ``select``, ``convert`` and ``constant``
keep their graph-level meaning on tiles; the ops here add what only a kernel has:

- ``program_id {axis, size}``: this program's index along a grid axis of ``size`` programs;
- ``element_index %i {block, dimension, shape}``: the i32 tile ``%i * block + iota(dimension)``,
  the array index of each element of a block (what masks and in-kernel iotas are made of);
- ``load %ref, %i0, ... {block, squeeze, masked, other}``: the block at block index
  ``(%i0, ...)`` (element offset ``%i * block`` per dimension); dimensions in ``masked`` read
  ``other`` past the array's end; ``squeeze`` drops block dimensions of 1. A low-bit weight is its
  arrays (``LowBitType.part_types``: u32 planes, then scales and zero-points declared f32, which
  is how kernels read them whatever dtype stores them);
- ``store %ref, %value, %i0, ...`` and ``atomic_add %ref, %value, %i0, ... {relaxed}``: the same
  addressing, writing (or adding into) the block, masked dimensions writing nothing past the end
  (``relaxed``: the adds need no memory ordering of their own; a later release orders them);
- an access with attribute ``when`` takes one more operand, last: an ``i1[]`` scalar; the access
  happens only where it is true (a load reads ``other`` where it is not);
- ``barrier {scope = "cta"}``: every thread of the program waits here for the others (a CTA
  barrier; the attribute also keeps its text unambiguous: an op of no operands and no results);
- ``arrive %counters, %i``: adds 1 to the i32 element ``%i`` of a 1-d array, atomically (acquire
  and release, GPU scope), and returns the element's old value (a split-K fixup's arrival count);
- ``loop %carried..., %captured... {body, trips, carried}``: ``body(i, carried..., captured...)``
  for ``i`` in ``0 .. trips-1``, returning the next carried values (an ``scf.for`` with
  ``iter_args``); results are the final carried values. With ``bounded = true`` its last two
  operands are ``i32[]`` scalars ``%start, %stop`` (computed from program ids) and ``i`` runs over
  ``start .. stop-1`` only, within ``0 .. trips-1`` (the verifier proves it): a causal attention's
  key loop skips the blocks its mask hides;
- ``dot_acc %acc, %a, %b {lhs_t, rhs_t, precision}``: ``acc + a @ b`` accumulated in acc's dtype;
- ``unpack %planes..., %scale, [%zero] {format, shape, dtype}``: a tile of a packed low-bit weight
  decoded in registers from its words and the tile's group scale (and zero-point).

The paired GEMV (``strategy = "gemv-pairs"``, see passes/to_tile.py) decodes two codes per 32-bit
operation and leaves the scale for after the group's sum, with two more ops:

- ``unpack_pair %words... {format, lane, dtype}``: from a [R, N] tile of words holding ``L = 32 / b``
  b-bit codes each, the [2R, N] tile whose element (2r + h, n) is code ``lane + h L/2`` of word
  (r, n) plus :func:`pair_bias` (``(w >> b lane) & mask`` holds both codes, one per 16-bit half,
  each ORed into a 16-bit float's mantissa: one shift and one LOP3 for two weights, no conversion).
  A 3-bit format packed "pairs" (fusec/lowprec/packing.py) gives its 2-bit plane's [R, N] words
  (``L = 16``) and its 1-bit plane's [R/2, N]: per 2-bit word and lane parity, a few shifts and
  LOP3s merge the top bits in (:func:`pair_merge_shifts`), then one shift and one LOP3 per pair;
- ``pick_lanes %x {lanes, lane}``: from a [M, B] tile, the [M, 2B/lanes] tile whose element
  (m, 2r + h) is x[m, lanes r + lane + h lanes/2]: the activations those codes multiply.

Both take ``count`` (1 or 2, default 1): lanes ``lane .. lane + count - 1``, each one's tile in
turn along K (one dot of twice the K: a kernel compiler chains its tensor-core steps instead of
adding separate dots' results). A 3-bit ``unpack_pair`` (and the ``pick_lanes`` beside it) has
``parity = true``: rows ordered by the parity c of the word first, element (c R + 2s + h) for word
r = 2s + c of the R (and column c B/lanes + 2s + h). Words 2s and 2s + 1 share a 1-bit word, so a
kernel splits the 2-bit words by parity and each thread still holds the K pairs a tensor-core
operand wants (no register shuffles).

A 4-bit NormalFloat or lookup-table format (``nf4``, ``lut4`` with its ``lut``) decodes in pairs
too, by byte permutes of the table (fusec/codegen/lut_asm.py), with an *adjacent* pairing: element
(2r + h, n) of ``unpack_pair``'s tile is code ``2 lane + h`` of word (r, n), the table value
rounded to the 16-bit float (no bias), and ``pick_lanes {adjacent}`` picks x[m, lanes r + 2 lane + h].
A table's ``unpack_pair`` decodes one lane (``count = 1``), in no parity order.
"""

from __future__ import annotations

from typing import Any

from fusec.ir.function import Function, Op, Value
from fusec.ir.opdefs import OPDEFS, Attrs, OpDef, Rule, TypeRuleError, _axes_attr, _elem, _shape_attr
from fusec.ir.types import BOOL, F32, I32, WORD_BITS, DType, LowBitType, TensorType

SCALAR_INDEX = TensorType(I32, ())
ACCESS_OPS = ("load", "store", "atomic_add")
TILE_OPS = ("program_id", "element_index", *ACCESS_OPS, "barrier", "arrive", "loop", "dot_acc", "unpack",
            "unpack_pair", "pick_lanes")
SCALAR_BOOL = TensorType(BOOL, ())


def access_indices(op: Op) -> tuple[Value, ...]:
    """An access op's block indices (after its ref and stored value, before its ``when``)."""
    first = 1 if op.opcode == "load" else 2
    return op.operands[first:len(op.operands) - int(bool(op.attr("when")))]


def access_predicate(op: Op) -> Value | None:
    """An access op's ``when`` operand: the scalar that says whether it happens at all."""
    return op.operands[-1] if op.attr("when") else None


def scratch_params(op: Op, program: Function) -> tuple[Value, ...]:
    """The tile program's arrays after the kernel op's inputs and outputs: workspace the kernel
    keeps to itself (a split-K fixup's f32 sums and arrival counters), zeroed by the caller and
    dropped after the call."""
    inputs = sum(len(v.type.elem.part_types(v.type.shape)) if isinstance(v.type.elem, LowBitType) else 1
                 for v in op.operands)
    return tuple(program.params[inputs + len(op.results):])


def _unpredicated(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    if not attrs.get("when"):
        return types
    if not types or types[-1] != SCALAR_BOOL:
        raise TypeRuleError(f"an access with attribute when ends with an i1[] predicate, got "
                            f"{types[-1] if types else 'none'}", len(types) - 1)
    return types[:-1]
# The 16-bit float whose mantissa a paired code is ORed into: 2^7 (bf16, 7 mantissa bits), 2^10 (f16).
PAIR_MAGIC = {"bf16": (0x4300, 128), "f16": (0x6400, 1024)}


def _int_attr(attrs: Attrs, key: str, lo: int) -> int:
    value = attrs[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise TypeRuleError(f"attribute {key}={value!r} must be an int >= {lo}")
    return value


def _program_id(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    _int_attr(attrs, "axis", 0)
    _int_attr(attrs, "size", 1)
    return [SCALAR_INDEX]


def _index_operands(types: list[TensorType], first: int) -> None:
    for i in range(first, len(types)):
        if types[i] != SCALAR_INDEX:
            raise TypeRuleError(f"has type {types[i]}, expected a block index i32[]", i)


def _element_index(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    _index_operands(types, 0)
    shape = _shape_attr(attrs)
    _int_attr(attrs, "block", 1)
    dim = attrs["dimension"]
    if not isinstance(dim, int) or not 0 <= dim < len(shape):
        raise TypeRuleError(f"dimension={dim!r} is not an axis of shape {list(shape)}")
    return [TensorType(I32, shape)]


def block_type(types: list[TensorType], attrs: Attrs, n_before_index: int) -> TensorType:
    """The tile an access moves: the block's shape less its squeezed dimensions."""
    array = types[0]
    if not isinstance(array.elem, DType):
        raise TypeRuleError(f"has type {array}; a kernel addresses arrays of standard dtypes (a low-bit "
                            "weight's planes and scales are separate arrays)", 0)
    if len(types) - n_before_index != array.rank:
        raise TypeRuleError(f"takes one block index per dimension of {array} ({array.rank}), "
                            f"got {len(types) - n_before_index}")
    _index_operands(types, n_before_index)
    block = _shape_attr(attrs, "block")
    if len(block) != array.rank or not all(b >= 1 for b in block):
        raise TypeRuleError(f"block={list(block)} must give a size >= 1 for each of the {array.rank} dimensions "
                            f"of {array}")
    squeeze = _axes_attr(attrs, "squeeze", array.rank) if "squeeze" in attrs else ()
    masked = _axes_attr(attrs, "masked", array.rank) if "masked" in attrs else ()
    for d in squeeze:
        if block[d] != 1:
            raise TypeRuleError(f"squeezed dimension {d} has block {block[d]}, not 1")
        if d in masked:
            raise TypeRuleError(f"squeezed dimension {d} cannot be masked: a squeezed index is always in bounds")
    return TensorType(array.elem, tuple(b for d, b in enumerate(block) if d not in squeeze))


def _load(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    types = _unpredicated(types, attrs)
    tile = block_type(types, attrs, 1)
    if (attrs.get("masked") or attrs.get("when")) and "other" not in attrs:
        raise TypeRuleError("a masked load needs attribute other, the value read past the array's end")
    return [tile]


def _store(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    types = _unpredicated(types, attrs)
    tile = block_type(types, attrs, 2)
    if types[1] != tile:
        raise TypeRuleError(f"has type {types[1]}, but the block written is {tile}", 1)
    return []


def _atomic_add(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    elem = types[0].elem
    if not (isinstance(elem, DType) and (elem.is_float or elem.is_int)):
        raise TypeRuleError(f"has type {types[0]}; atomic adds take float or integer arrays", 0)
    return _store(types, attrs)


def _barrier(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    if attrs["scope"] != "cta":
        raise TypeRuleError(f"scope={attrs['scope']!r}: a tile program's barrier is the program's (\"cta\")")
    return []


def _arrive(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    counters, index = types
    if counters.elem != I32 or counters.rank != 1:
        raise TypeRuleError(f"has type {counters}; arrival counters are a 1-d i32 array", 0)
    if index != SCALAR_INDEX:
        raise TypeRuleError(f"has type {index}, expected an element index i32[]", 1)
    return [SCALAR_INDEX]


def _loop(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    if not isinstance(attrs["body"], str):
        raise TypeRuleError(f"attribute body={attrs['body']!r} must name a function")
    _int_attr(attrs, "trips", 0)
    carried = _int_attr(attrs, "carried", 0)
    bounds = 2 if attrs.get("bounded") else 0
    if carried > len(types) - bounds:
        raise TypeRuleError(f"carries {carried} values but has {len(types) - bounds} operands besides its bounds")
    for i in range(len(types) - bounds, len(types)):
        if types[i] != SCALAR_INDEX:
            raise TypeRuleError(f"has type {types[i]}; a bounded loop's start and stop are i32[] scalars", i)
    return types[:carried]


def loop_inputs(op: Any) -> tuple[Any, ...]:
    """A loop op's carried and captured operands (what its body takes after the index)."""
    return op.operands[:-2] if op.attr("bounded") else op.operands


def loop_bounds(op: Any) -> tuple[Any, Any] | None:
    """A bounded loop's ``(start, stop)`` operands, or None for ``0 .. trips``."""
    return (op.operands[-2], op.operands[-1]) if op.attr("bounded") else None


def _dot_acc(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    acc, a, b = types
    if a.rank != 2 or b.rank != 2 or acc.rank != 2:
        raise TypeRuleError(f"tile dots take 2-d tiles, got {acc}, {a} and {b}", 0 if acc.rank != 2 else 1)
    m, k = (a.shape[1], a.shape[0]) if attrs["lhs_t"] else a.shape
    k2, n = (b.shape[1], b.shape[0]) if attrs["rhs_t"] else b.shape
    if k != k2:
        raise TypeRuleError(f"contracting size {k2} differs from the lhs's {k}", 2)
    if a.elem != b.elem:
        raise TypeRuleError(f"has element type {b.elem}, expected {a.elem}", 2)
    if acc.shape != (m, n):
        raise TypeRuleError(f"accumulator {acc} is not [{m},{n}]", 0)
    want = I32 if isinstance(a.elem, DType) and a.elem.is_int else F32
    if acc.elem != want:
        raise TypeRuleError(f"accumulates in {acc.elem}; {a.elem} products accumulate in {want}", 0)
    return [acc]


def _unpack(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    fmt = _elem(attrs, "format")
    if not isinstance(fmt, LowBitType) or fmt.group is None:
        raise TypeRuleError(f"format={attrs['format']!r} is not a grouped low-bit format such as i3g128")
    rows, cols = _shape_attr(attrs)
    widths = fmt.plane_widths
    want = len(widths) + 1 + int(fmt.zero_point)
    if len(types) != want:
        raise TypeRuleError(f"{fmt} unpacks from {len(widths)} plane tile(s) and {want - len(widths)} scale "
                            f"tile(s), got {len(types)} operands")
    for i, p in enumerate(widths):
        words = TensorType(DType("u32"), (rows * p // 32, cols))
        if rows * p % 32 or types[i] != words:
            raise TypeRuleError(f"has type {types[i]}; {rows} rows of {p}-bit codes are {words}", i)
    for i in range(len(widths), want):
        if types[i] != TensorType(F32, (1, cols)):
            raise TypeRuleError(f"has type {types[i]}, expected the tile's f32[1,{cols}] scale row", i)
    if fmt.family == "lut" and len(attrs.get("lut", ())) != 2**fmt.bits:
        raise TypeRuleError(f"a {fmt.bits}-bit lookup table needs {2**fmt.bits} values in attribute lut")
    return [TensorType(_elem(attrs, "dtype"), (rows, cols))]


def pair_format_ok(fmt: object, dtype: str) -> bool:
    """Whether ``unpack_pair`` decodes ``fmt`` to ``dtype``: a grouped symmetric integer format of
    one power-of-two plane, or of a 2-bit and a 1-bit plane packed "pairs", whose biased codes fit
    the float's mantissa; or a grouped 4-bit table."""
    if not isinstance(fmt, LowBitType) or fmt.group is None or fmt.zero_point or dtype not in PAIR_MAGIC:
        return False
    if pair_is_table(fmt):
        return True
    widths = fmt.plane_widths
    if fmt.family != "int" or not (len(widths) == 1 and widths[0] in (2, 4, 8) or
                                   widths == (2, 1) and fmt.packing == "pairs"):
        return False
    return 2 ** fmt.bits <= PAIR_MAGIC[dtype][1]


def pair_lanes(fmt: LowBitType) -> int:
    """Codes per word of the plane ``unpack_pair`` pairs lanes of (the widest)."""
    return WORD_BITS // fmt.plane_widths[0]


def pair_is_table(fmt: object) -> bool:
    """Whether ``fmt`` pairs by table permutes (adjacent codes, no bias): 4-bit nf or lut."""
    return isinstance(fmt, LowBitType) and fmt.family in ("nf", "lut") and fmt.bits == 4


def pair_bias(fmt: LowBitType, dtype: str) -> int:
    """What ``unpack_pair`` adds to each signed code: the magic power of two plus half the range."""
    return PAIR_MAGIC[dtype][1] + 2 ** (fmt.bits - 1)


def pair_decode_constants(op_attrs: Attrs) -> tuple[int, int, int]:
    """For an ``unpack_pair`` op's attributes: the shift that brings lane ``lane`` to bit 0, the
    mask keeping both codes of the pair (bits 0 and 16 up), and the XOR that flips their sign bits
    and sets the 16-bit float exponent they become the mantissa of (both halves)."""
    fmt = _elem(op_attrs, "format")
    assert isinstance(fmt, LowBitType)
    bits, dtype = fmt.bits, str(_elem(op_attrs, "dtype"))
    flip = (PAIR_MAGIC[dtype][0] | 2 ** (bits - 1)) * 0x10001
    lane = int(op_attrs["lane"])
    if fmt.plane_widths == (2, 1):  # the merged word (pair_merge_shifts) holds the codes at 4-bit strides
        return 4 * (lane // 2), 0x70007, flip
    return bits * lane, (2**bits - 1) * 0x10001, flip


# A 3-bit "pairs" weight (fusec/lowprec/packing.py): row 2 s + c of its 1-bit words repeated to one
# per 2-bit word is word s shifted left by PAIR3_COPY_SHIFTS[c]; masked, it holds each code's top bit.
PAIR3_COPY_SHIFTS = (0, 2)
PAIR3_LOW_MASK, PAIR3_TOP_MASK = 0x33333333, 0x44444444


def pair_merge_shifts(op_attrs: Attrs) -> tuple[int, int]:
    """For an ``unpack_pair`` of a 3-bit "pairs" weight: the right shifts of its 2-bit words and of
    its repeated 1-bit words that, masked by PAIR3_LOW_MASK and PAIR3_TOP_MASK and ORed, give the
    word holding lane ``lane``'s pair (and every lane of its parity) as whole 3-bit codes at 4-bit
    strides: (2, 1) for odd lanes, (0, 0) for even ones. Computed once per word and parity."""
    odd = int(op_attrs["lane"]) % 2
    return 2 * odd, odd


def _unpack_pair(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    fmt, dtype = _elem(attrs, "format"), _elem(attrs, "dtype")
    if not pair_format_ok(fmt, str(dtype)):
        raise TypeRuleError(f"format={attrs['format']!r} does not decode in pairs to {dtype}")
    assert isinstance(fmt, LowBitType)
    widths = fmt.plane_widths
    if len(types) != len(widths):
        raise TypeRuleError(f"{fmt} decodes in pairs from {len(widths)} plane tile(s), got {len(types)} operands")
    words = types[0]
    lanes = pair_lanes(fmt)
    lane, count = _int_attr(attrs, "lane", 0), _count(attrs)
    if words.elem != DType("u32") or words.rank != 2 or lane + count > lanes // 2:
        raise TypeRuleError(f"takes a 2-d u32 tile of words and lanes below {lanes // 2}, got {words}, "
                            f"lane={lane}, count={count}", 0)
    if _parity(attrs) != (len(widths) > 1):
        raise TypeRuleError(f"{fmt} decodes in pairs with parity={len(widths) > 1} (rows ordered by word parity "
                            "where 1-bit words are shared by two 2-bit words)")
    for i, p in enumerate(widths[1:], 1):
        want = TensorType(DType("u32"), (words.shape[0] * p // widths[0], words.shape[1]))
        if words.shape[0] * p % widths[0] or types[i] != want:
            raise TypeRuleError(f"has type {types[i]}; the {p}-bit plane of {words} is {want}", i)
    if pair_is_table(fmt):
        if count != 1:
            raise TypeRuleError(f"count={count}: a table format decodes one lane per unpack_pair (count = 1)")
        if fmt.family == "lut" and len(attrs.get("lut", ())) != 2**fmt.bits:
            raise TypeRuleError(f"a {fmt.bits}-bit lookup table needs {2**fmt.bits} values in attribute lut")
    return [TensorType(dtype, (2 * count * words.shape[0], words.shape[1]))]  # type: ignore[arg-type]


def _count(attrs: Attrs) -> int:
    value = attrs.get("count", 1)
    if value not in (1, 2) or isinstance(value, bool):
        raise TypeRuleError(f"attribute count={value!r} must be 1 or 2")
    return int(value)


def _parity(attrs: Attrs) -> bool:
    value = attrs.get("parity", False)
    if not isinstance(value, bool):
        raise TypeRuleError(f"attribute parity={value!r} must be a bool")
    return value


def _pick_lanes(types: list[TensorType], attrs: Attrs) -> list[TensorType]:
    (x,) = types
    lanes, lane = _int_attr(attrs, "lanes", 2), _int_attr(attrs, "lane", 0)
    if not isinstance(attrs.get("adjacent", False), bool):
        raise TypeRuleError(f"attribute adjacent={attrs['adjacent']!r} must be a bool")
    if _parity(attrs) and x.rank == 2 and x.shape[1] % (2 * lanes):
        raise TypeRuleError(f"parity order takes a tile whose columns divide into twice {lanes} lanes, got {x}", 0)
    count = _count(attrs)
    if attrs.get("adjacent") and (count != 1 or _parity(attrs)):
        raise TypeRuleError(f"adjacent pairing (table formats) takes one lane (count = 1) and no parity order, got "
                            f"count={count}, parity={_parity(attrs)}")
    if x.rank != 2 or lanes % 2 or x.shape[1] % lanes or lane + count > lanes // 2:
        raise TypeRuleError(f"takes a 2-d tile whose columns divide into {lanes} lanes (an even number) and "
                            f"lanes below {lanes // 2}, got {x}, lane={lane}, count={count}", 0)
    return [x.with_shape((x.shape[0], 2 * count * x.shape[1] // lanes))]


_TILE_DEFS: list[tuple[str, int, int | None, tuple[str, ...], Rule]] = [
    ("program_id", 0, 0, ("axis", "size"), _program_id),
    ("element_index", 1, 1, ("block", "dimension", "shape"), _element_index),
    ("load", 1, None, ("block",), _load),
    ("store", 2, None, ("block",), _store),
    ("atomic_add", 2, None, ("block",), _atomic_add),
    ("barrier", 0, 0, ("scope",), _barrier),
    ("arrive", 2, 2, (), _arrive),
    ("loop", 0, None, ("body", "trips", "carried"), _loop),
    ("dot_acc", 3, 3, ("lhs_t", "rhs_t"), _dot_acc),
    ("unpack", 2, None, ("format", "shape", "dtype"), _unpack),
    ("unpack_pair", 1, None, ("format", "lane", "dtype"), _unpack_pair),
    ("pick_lanes", 1, 1, ("lanes", "lane"), _pick_lanes),
]
for _opcode, _lo, _hi, _attrs, _rule in _TILE_DEFS:
    OPDEFS[_opcode] = OpDef(_opcode, _lo, _hi, _attrs, _rule, "tile")
