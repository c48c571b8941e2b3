"""Kernel source for the tile op ``unpack``: decodes a [bk, bn] tile of a packed low-bit weight in registers.

Each power-of-two plane's words for the tile's rows are loaded once, repeated to one row per code
(broadcast + reshape), shifted by the code's lane and masked; the planes are ORed into codes, the
codes decoded (two's complement through a float bit pattern rather than an int-to-float
conversion, zero-point, small-float bit fields, or, for NormalFloat and lookup
tables, a chain of selects over the table's values) and scaled by the tile's group scale. See fusec/lowprec/packing.py.
"""

from __future__ import annotations

from fusec.codegen.pallas_text import literal
from fusec.ir import DType, LowBitType, Op, parse_elem_type
from fusec.ir.tile_ops import pair_decode_constants, pair_planes
from fusec.ir.types import WORD_BITS
from fusec.lowprec.formats import format_of


def unpack_source(op: Op, args: list[str]) -> list[str]:
    """Lines of a function body that decodes an ``unpack`` op's tile from its operands ``args``
    (the planes' word tiles, the scale row, the zero-point row) and returns it."""
    fmt = parse_elem_type(str(op.attr("format")))
    assert isinstance(fmt, LowBitType)
    bk, bn = op.attr("shape")
    lines = []
    shift = 0
    for i, p in enumerate(fmt.plane_widths):
        per_word = WORD_BITS // p
        rows = bk // per_word
        lane = f"lax.broadcasted_iota(jnp.int32, ({bk}, {bn}), 0) % {per_word}"
        lines += [
            f"words = jnp.broadcast_to({args[i]}[:, None, :], ({rows}, {per_word}, {bn})).reshape({bk}, {bn})",
            f"lanes = ({lane_expr(fmt, i, lane)}).astype(jnp.uint32) * {p}",
            f"codes = {'codes | ' if shift else ''}((words >> lanes) & {2**p - 1}){f' << {shift}' if shift else ''}",
        ]
        shift += p
    n_planes = len(fmt.plane_widths)
    out = DType(str(op.attr("dtype")))
    if fmt.family == "int" and out.name == "bf16" and fmt.bits <= 7:
        # bfloat16 throughout, two weights per instruction: 128 + the biased code is the bf16 bit
        # pattern 0x4300 | code; a bf16 product of the code and a bf16 scale rounds once, as the
        # reference's f32 product cast to bf16 does. Decided as the kernel is traced: the scales'
        # stored dtype (the scale operand arrives uncast) must be bfloat16.
        half = 2 ** (fmt.bits - 1)
        lines += [f"if {args[n_planes]}.dtype == jnp.bfloat16:",
                  f"    biased = lax.bitcast_convert_type((codes ^ {half | 0x4300}).astype(jnp.uint16), jnp.bfloat16)",
                  f"    return (biased - jnp.bfloat16({float(128 + half)!r})) * {args[n_planes]}"]
    lines.append(f"scale = {args[n_planes]}.astype(jnp.float32)")
    if fmt.family == "int":
        # Int to float without I2F: the code with its sign bit flipped (c + 2^(b-1), as unsigned) ORed
        # into the mantissa of 2^23 is exactly 2^23 + c + 2^(b-1) as f32 bits; subtracting gives c.
        half = 2 ** (fmt.bits - 1)
        # (One XOR: the code's bits lie below 2^23's; with the mask above, a single LOP3.)
        lines += [f"biased = lax.bitcast_convert_type(codes ^ {half | 0x4B000000}, jnp.float32)",
                  f"values = biased - {float(2**23 + half)!r}"]
    elif fmt.family == "uint":
        lines.append(f"zero = {args[n_planes + 1]}.astype(jnp.float32)")
        # The code ORed into the mantissa of 2^23, less 2^23: exact, and no I2F.
        lines.append("values = (lax.bitcast_convert_type(codes | 0x4B000000, jnp.float32) - 8388608.0) - zero")
    elif fmt.family == "float":
        e, m = fmt.exp_bits or 0, fmt.bits - 1 - (fmt.exp_bits or 0)
        bias = 2 ** (e - 1) - 1
        lines += [
            "c = codes.astype(jnp.int32)",
            f"exponent = (c >> {m}) & {2**e - 1}",
            f"mantissa = (c & {2**m - 1}).astype(jnp.float32)",
            f"magnitude = jnp.where(exponent == 0, mantissa * {2.0 ** (1 - bias - m)!r}, "
            f"(mantissa + {float(2**m)!r}) * jnp.exp2((exponent - {bias + m}).astype(jnp.float32)))",
            f"values = jnp.where((c >> {e + m}) & 1 == 1, -magnitude, magnitude)",
        ]
    else:
        table = [float(v) for v in format_of(fmt, op.attr("lut")).table]
        lines.append(f"values = jnp.full(({bk}, {bn}), {literal(table[0])}, jnp.float32)")
        lines += [f"values = jnp.where(codes == {c}, {literal(v)}, values)" for c, v in enumerate(table) if c]
    lines.append(f"return (values * scale).astype(jnp.{out.numpy_name})")
    return lines


def lane_expr(fmt: LowBitType, plane: int, row: str) -> str:
    """The lane of a word's row ``row`` (an int32 expression) in plane ``plane``: the row itself,
    or for the "pairs" packing the row with two bits swapped (``LowBitType.lane_order``). Written
    with operators both kernel languages share."""
    order = fmt.lane_order(plane)
    if order == tuple(range(len(order))):
        return row
    a, b = next((t, order[t]) for t in range(len(order)) if order[t] != t)  # the two swapped bits
    shift = (b // a).bit_length() - 1
    return f"(({row}) & {len(order) - 1 - a - b}) | ((({row}) & {a}) << {shift}) | ((({row}) & {b}) >> {shift})"


def unpack_pair_source(op: Op, words: str, planes: tuple[str, ...] = ()) -> list[str]:
    """Lines of a function body that decodes an ``unpack_pair`` op (fusec/ir/tile_ops.py): lane
    ``j`` and ``j + L/2`` of every word sit 16 bits apart, so one shift and one mask give both
    codes; XOR flips their sign bits (two's complement to code + half) and sets the 16-bit float
    exponent whose mantissa they become; the halves are the two float bit patterns, interleaved
    along K (a register pair, as the matmul's operand wants it). A narrower plane's words
    (``planes``, "pairs" packing) are repeated to one row per widest-plane word, each copy shifted
    so that one more shift and mask per lane put its bits at the codes' offset, and ORed in."""
    out = str(op.attr("dtype"))
    rows, cols = op.operands[0].type.shape
    shift, both, flip = pair_decode_constants(op.attr_dict)
    float_dtype = f"jnp.{DType(out).numpy_name}"
    shifted = f"({words} >> {shift})" if shift else words
    lines, term = [], f"({shifted} & {both:#x})"
    for i, (name, (copies, lane_shift, mask)) in enumerate(zip(planes, pair_planes(op.attr_dict))):
        moved = [f"({name} >> {e})" if e > 0 else f"({name} << {-e})" if e else name for e in copies]
        if len(moved) == 1:
            lines.append(f"r{i} = {moved[0]}")
        else:  # copy c of word s is row f s + c (Pallas's Triton lowering stacks on the last axis only)
            lines.append(f"r{i} = jnp.stack([{', '.join(moved)}], axis=-1).transpose(0, 2, 1).reshape({rows}, {cols})")
        lines.append(f"t{i} = (r{i} >> {lane_shift}) & {mask:#x}" if lane_shift else f"t{i} = r{i} & {mask:#x}")
        term += f" | t{i}"
    return lines + [
        f"p = ({term}) ^ {flip:#x}",
        f"lo = lax.bitcast_convert_type((p & 0xFFFF).astype(jnp.uint16), {float_dtype})",
        f"hi = lax.bitcast_convert_type((p >> 16).astype(jnp.uint16), {float_dtype})",
        f"return jnp.stack([lo, hi], axis=-1).transpose(0, 2, 1).reshape({2 * rows}, {cols})",
    ]
