"""Triton source for the tile op ``unpack``: a [bk, bn] tile of a packed low-bit weight decoded in
registers, as the Pallas writer decodes it (fusec/codegen/pallas_unpack.py; fusec/lowprec/packing.py).

Each plane's word tile is repeated to one row per code (broadcast + reshape), shifted by the code's
lane and masked; planes are ORed into codes; codes are decoded (two's complement through a float bit
pattern instead of an int-to-float conversion, zero-points, small-float bit fields, or a chain of
selects over a NormalFloat or lookup table) and multiplied by the tile's scale row.
"""

from __future__ import annotations

from fusec.codegen.lut_asm import CONSTRAINTS, lut4_pair_asm, table_bits16
from fusec.codegen.pallas_unpack import lane_expr
from fusec.codegen.triton.text import TL_DTYPES
from fusec.ir import DType, LowBitType, Op, parse_elem_type
from fusec.ir.tile_ops import (
    PAIR3_COPY_SHIFTS,
    PAIR3_LOW_MASK,
    PAIR3_TOP_MASK,
    pair_decode_constants,
    pair_is_table,
    pair_merge_shifts,
)
from fusec.ir.types import WORD_BITS
from fusec.lowprec.formats import format_of


def unpack_lines(op: Op, args: list[str], prefix: str) -> list[str]:
    """Statements decoding an ``unpack`` op's tile from its operands ``args`` (plane word tiles,
    the scale row, the zero-point row), temporaries named ``prefix...``; the last item is the
    expression of the decoded tile."""
    fmt = parse_elem_type(str(op.attr("format")))
    assert isinstance(fmt, LowBitType)
    bk, bn = op.attr("shape")
    p_ = prefix
    lines = []
    shift = 0
    for i, p in enumerate(fmt.plane_widths):
        per_word = WORD_BITS // p
        rows = bk // per_word
        words = f"tl.reshape(tl.broadcast_to({args[i]}[:, None, :], ({rows}, {per_word}, {bn})), ({bk}, {bn}))"
        lanes = f"(({lane_expr(fmt, i, f'tl.arange(0, {bk})[:, None] % {per_word}')}).to(tl.uint32) * {p})"
        bits = f"(({words} >> {lanes}) & {2**p - 1})"
        if shift:
            lines.append(f"{p_}codes = {p_}codes | ({bits} << {shift})")
        else:
            lines.append(f"{p_}codes = {bits}")
        shift += p
    n_planes = len(fmt.plane_widths)
    codes = f"{p_}codes"
    lines.append(f"{p_}scale = {args[n_planes]}.to(tl.float32)")
    if fmt.family == "int":
        # Int to float without I2F: the code with its sign bit flipped, ORed into the mantissa of
        # 2^23, is exactly 2^23 + c + 2^(b-1) as f32 bits; subtracting gives c.
        half = 2 ** (fmt.bits - 1)
        lines.append(f"{p_}values = ({codes} ^ {half | 0x4B000000}).to(tl.float32, bitcast=True) - "
                     f"{float(2**23 + half)!r}")
    elif fmt.family == "uint":
        lines.append(f"{p_}values = (({codes} | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0) - "
                     f"{args[n_planes + 1]}.to(tl.float32)")
    elif fmt.family == "float":
        e, m = fmt.exp_bits or 0, fmt.bits - 1 - (fmt.exp_bits or 0)
        bias = 2 ** (e - 1) - 1
        lines += [
            f"{p_}c = {codes}.to(tl.int32)",
            f"{p_}exponent = ({p_}c >> {m}) & {2**e - 1}",
            f"{p_}mantissa = ({p_}c & {2**m - 1}).to(tl.float32)",
            f"{p_}magnitude = tl.where({p_}exponent == 0, {p_}mantissa * {2.0 ** (1 - bias - m)!r}, "
            f"({p_}mantissa + {float(2**m)!r}) * tl.exp2(({p_}exponent - {bias + m}).to(tl.float32)))",
            f"{p_}values = tl.where((({p_}c >> {e + m}) & 1) == 1, -{p_}magnitude, {p_}magnitude)",
        ]
    else:
        table = [float(v) for v in format_of(fmt, op.attr("lut")).table]
        lines.append(f"{p_}values = tl.full(({bk}, {bn}), {table[0]!r}, tl.float32)")
        lines += [f"{p_}values = tl.where({codes} == {c}, {v!r}, {p_}values)" for c, v in enumerate(table) if c]
    out = DType(str(op.attr("dtype")))
    lines.append(f"({p_}values * {p_}scale).to({TL_DTYPES[out.name]})")
    return lines


def unpack_pair_lines(op: Op, words: str, prefix: str, planes: tuple[str, ...] = ()) -> list[str]:
    """Statements decoding an ``unpack_pair`` op (fusec/ir/tile_ops.py), as the Pallas writer does:
    lanes ``j`` and ``j + L/2`` of every word sit 16 bits apart, so one shift and one mask give both
    codes, and XOR flips their sign bits and sets the 16-bit float exponent whose mantissa they
    become; the two halves interleave along K. A 3-bit weight's 1-bit words (``planes``) are
    repeated to one per 2-bit word and merged into it first. The last item is the decoded tile's
    expression."""
    out = str(op.attr("dtype"))
    rows, cols = op.operands[0].type.shape
    half = lambda x: f"({x}).to(tl.uint16).to({TL_DTYPES[out]}, bitcast=True)"  # noqa: E731
    lines = []
    count = int(op.attr("count", 1))
    if not planes:
        tiles = []
        table = pair_is_table(parse_elem_type(str(op.attr("format"))))  # count = 1 (tile_ops)
        for t in range(count):
            q = f"{prefix}{t}"
            if table:
                lines += _table_pair_lines(op, words, f"{q}p")
            else:
                shift, both, flip = pair_decode_constants(op.attr_dict | {"lane": int(op.attr("lane")) + t})
                shifted = f"({words} >> {shift})" if shift else words
                lines.append(f"{q}p = ({shifted} & {both:#x}) ^ {flip:#x}")
            lines += [f"{q}v = tl.reshape(tl.permute(tl.join({half(f'{q}p & 0xFFFF')}, {half(f'{q}p >> 16')}), "
                      f"(0, 2, 1)), ({2 * rows}, {cols}))"]
            tiles.append(f"{q}v")
        return lines + [_lanes_along_k(tiles, rows, cols)]
    # 3 bits (parity order): 2-bit words 2s + c split by c, each merged with 1-bit word s.
    (top,) = planes
    lines.append(f"{prefix}w0, {prefix}w1 = tl.split(tl.permute(tl.reshape({words}, ({rows // 2}, 2, {cols})), "
                 f"(0, 2, 1)))")
    tiles = []
    for t in range(int(op.attr("count", 1))):
        attrs = op.attr_dict | {"lane": int(op.attr("lane")) + t}
        (shift, both, flip), (word_shift, top_shift) = pair_decode_constants(attrs), pair_merge_shifts(attrs)
        q = f"{prefix}{t}"
        for c, copy in enumerate(PAIR3_COPY_SHIFTS):
            low = f"({prefix}w{c} >> {word_shift})" if word_shift else f"{prefix}w{c}"
            high = f"({top} << {copy})" if copy else top
            high = f"({high} >> {top_shift})" if top_shift else high
            lines += [f"{q}m{c} = (({low} & {PAIR3_LOW_MASK:#x}) | ({high} & {PAIR3_TOP_MASK:#x}))",
                      f"{q}p{c} = ({f'({q}m{c} >> {shift})' if shift else f'{q}m{c}'} & {both:#x}) ^ {flip:#x}",
                      f"{q}h{c} = tl.join({half(f'{q}p{c} & 0xFFFF')}, {half(f'{q}p{c} >> 16')})"]
        # (s, n, h, c) -> rows c R + 2 s + h
        lines.append(f"{q}v = tl.reshape(tl.permute(tl.join({q}h0, {q}h1), (3, 0, 2, 1)), ({2 * rows}, {cols}))")
        tiles.append(f"{q}v")
    return lines + [_lanes_along_k(tiles, rows, cols)]


def _lanes_along_k(tiles: list[str], rows: int, cols: int) -> str:
    """The lanes' [2 rows, cols] tiles (one or two), one after another along K."""
    if len(tiles) == 1:
        return tiles[0]
    return f"tl.reshape(tl.permute(tl.join({tiles[0]}, {tiles[1]}), (2, 0, 1)), ({4 * rows}, {cols}))"


def _table_pair_lines(op: Op, words: str, p: str) -> list[str]:
    """Statements writing ``p``, the pair word (code 2 lane low, 2 lane + 1 high, as 16-bit float
    patterns) of each word of a 4-bit table format: byte permutes (fusec/codegen/lut_asm.py) on a
    GPU, selects in the interpreter, which runs no PTX."""
    fmt = parse_elem_type(str(op.attr("format")))
    assert isinstance(fmt, LowBitType)
    bits = table_bits16(format_of(fmt, op.attr("lut")).table, str(op.attr("dtype")))
    lane = int(op.attr("lane"))
    lines = ["if FUSEC_INTERPRETED:"]
    for h in range(2):
        c, b = f"{p}c{h}", f"{p}b{h}"
        lines += [f"    {c} = ({words} >> {8 * lane + 4 * h}) & 15", f"    {b} = {c} * 0 + {bits[0]}"]
        lines += [f"    {b} = tl.where({c} == {k}, {v}, {b})" for k, v in enumerate(bits) if k]
    return [*lines, f"    {p} = {p}b0 | ({p}b1 << 16)", "else:",
            f"    {p} = tl.inline_asm_elementwise({lut4_pair_asm(bits, lane)!r}, {CONSTRAINTS!r}, [{words}], "
            "dtype=tl.uint32, is_pure=True, pack=1)"]
