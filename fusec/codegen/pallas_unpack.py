"""Kernel source for the tile op ``unpack``: decodes a [bk, bn] tile of a packed low-bit weight in registers.

Each power-of-two plane's words for the tile's rows are loaded once, repeated to one row per code
(broadcast + reshape), shifted by the code's lane and masked; the planes are ORed into codes, the
codes decoded (two's complement through a float bit pattern rather than an int-to-float
conversion, zero-point, small-float bit fields, or, for NormalFloat and lookup
tables, a chain of selects over the table's values) and scaled by the tile's group scale. See fusec/lowprec/packing.py.
"""

from __future__ import annotations

from fusec.codegen.lut_asm import CONSTRAINTS, lut4_pair_asm, table_bits16
from fusec.codegen.pallas_text import literal
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
    """The lane of a word's row ``row`` (an int32 expression in 0 .. L-1) in plane ``plane``
    (``LowBitType.lane_order``): each bit of the lane is one bit of the row, maybe inverted, so
    masks, shifts and one XOR, written with operators both kernel languages share."""
    order = fmt.lane_order(plane)
    if order == tuple(range(len(order))):
        return row
    width = (len(order) - 1).bit_length()
    moves: dict[int, int] = {}  # shift (left) -> mask of the row's bits it moves
    flip = 0
    for out in range(width):
        got = [(order[t] >> out) & 1 for t in range(len(order))]
        src = next((b for b in range(width) if all(got[t] == ((t >> b) & 1) ^ got[0] for t in range(len(order)))), None)
        if src is None:
            raise NotImplementedError(f"the lane order of plane {plane} of {fmt} is not a map of the row's bits")
        flip |= got[0] << out
        moves[out - src] = moves.get(out - src, 0) | 1 << src
    terms = [f"(({row}) & {m})" if d == 0 else f"((({row}) & {m}) << {d})" if d > 0 else f"((({row}) & {m}) >> {-d})"
             for d, m in sorted(moves.items())]
    return f"(({' | '.join(terms)}) ^ {flip})" if flip else f"({' | '.join(terms)})"


def unpack_pair_source(op: Op, words: str, planes: tuple[str, ...] = ()) -> list[str]:
    """Lines of a function body that decodes an ``unpack_pair`` op (fusec/ir/tile_ops.py): lane
    ``j`` and ``j + L/2`` of every word sit 16 bits apart, so one shift and one mask give both
    codes; XOR flips their sign bits (two's complement to code + half) and sets the 16-bit float
    exponent whose mantissa they become; the halves are the two float bit patterns, interleaved
    along K (a register pair, as the matmul's operand wants it). A 3-bit weight's 2-bit words are
    split by parity (rows in ``parity`` order, tile_ops) and each half merged with its 1-bit words
    (``planes``) first (the same lines for every lane of a parity: the kernel compiler computes
    them once)."""
    out = str(op.attr("dtype"))
    rows, cols = op.operands[0].type.shape
    float_dtype = f"jnp.{DType(out).numpy_name}"
    count = int(op.attr("count", 1))
    if not planes:
        lines = []
        table = pair_is_table(parse_elem_type(str(op.attr("format"))))  # count = 1 (tile_ops)
        for t in range(count):
            if table:
                lines += _table_pair_source(op, words, f"p{t}")
            else:
                shift, both, flip = pair_decode_constants(op.attr_dict | {"lane": int(op.attr("lane")) + t})
                shifted = f"({words} >> {shift})" if shift else words
                lines.append(f"p{t} = ({shifted} & {both:#x}) ^ {flip:#x}")
            lines += [
                f"lo{t} = lax.bitcast_convert_type((p{t} & 0xFFFF).astype(jnp.uint16), {float_dtype})",
                f"hi{t} = lax.bitcast_convert_type((p{t} >> 16).astype(jnp.uint16), {float_dtype})",
                f"v{t} = jnp.stack([lo{t}, hi{t}], axis=-1).transpose(0, 2, 1).reshape({2 * rows}, {cols})",
            ]
        return lines + [_lanes_along_k([f"v{t}" for t in range(count)], rows, cols)]
    # 3 bits (parity order): 2-bit words 2s + c split by c, each merged with 1-bit word s.
    (top,) = planes
    lines = [f"w0, w1 = (h.reshape({rows // 2}, {cols}) for h in jnp.split({words}.reshape({rows // 2}, 2, {cols})"
             f".transpose(0, 2, 1), 2, axis=-1))"]
    tiles = []
    for t in range(int(op.attr("count", 1))):
        attrs = op.attr_dict | {"lane": int(op.attr("lane")) + t}
        (shift, both, flip), (word_shift, top_shift) = pair_decode_constants(attrs), pair_merge_shifts(attrs)
        halves = []
        for c, copy in enumerate(PAIR3_COPY_SHIFTS):
            low = f"(w{c} >> {word_shift})" if word_shift else f"w{c}"
            high = f"({top} << {copy})" if copy else top
            high = f"({high} >> {top_shift})" if top_shift else high
            lo, hi = (f"lax.bitcast_convert_type(({x}).astype(jnp.uint16), {float_dtype})"
                      for x in (f"p{t}{c} & 0xFFFF", f"p{t}{c} >> 16"))
            lines += [f"m{t}{c} = ({low} & {PAIR3_LOW_MASK:#x}) | ({high} & {PAIR3_TOP_MASK:#x})",
                      f"p{t}{c} = ({f'(m{t}{c} >> {shift})' if shift else f'm{t}{c}'} & {both:#x}) ^ {flip:#x}",
                      f"h{t}{c} = jnp.stack([{lo}, {hi}], axis=-1)"]
            halves.append(f"h{t}{c}")
        # (s, n, h, c) -> rows c R + 2 s + h
        lines.append(f"v{t} = jnp.stack([{', '.join(halves)}], axis=-1).transpose(3, 0, 2, 1).reshape({2 * rows}, "
                     f"{cols})")
        tiles.append(f"v{t}")
    return lines + [_lanes_along_k(tiles, rows, cols)]


def _lanes_along_k(tiles: list[str], rows: int, cols: int) -> str:
    """The return of the lanes' [2 rows, cols] tiles, one after another along K."""
    if len(tiles) == 1:
        return f"return {tiles[0]}"
    stacked = f"jnp.stack([{', '.join(tiles)}], axis=-1).transpose(2, 0, 1)"
    return f"return {stacked}.reshape({2 * rows * len(tiles)}, {cols})"


# The kernel body's keyword saying whether it may run PTX: False in interpret mode (pallas.py).
ASM_FLAG = "_fusec_asm"


def _table_pair_source(op: Op, words: str, p: str) -> list[str]:
    """Statements writing ``p``, the pair word (code 2 lane low, 2 lane + 1 high, as 16-bit float
    patterns) of each word of a 4-bit table format: byte permutes (fusec/codegen/lut_asm.py)
    through ``plgpu.elementwise_inline_asm`` on a GPU; selects in interpret mode, which runs no
    PTX, or on a JAX without that function."""
    fmt = parse_elem_type(str(op.attr("format")))
    assert isinstance(fmt, LowBitType)
    bits = table_bits16(format_of(fmt, op.attr("lut")).table, str(op.attr("dtype")))
    lane = int(op.attr("lane"))
    halves = []
    for h in range(2):
        c = f"(({words} >> {8 * lane + 4 * h}) & 15)"
        expr = f"jnp.full({words}.shape, {bits[0]}, jnp.uint32)"
        for k, v in enumerate(bits):
            if k:
                expr = f"jnp.where({c} == {k}, jnp.uint32({v}), {expr})"
        halves.append(expr)
    return [f'if {ASM_FLAG} and hasattr(plgpu, "elementwise_inline_asm"):',
            # (int32 out: Triton IR's integers are signless, a ui32 result does not verify)
            f"    [{p}] = plgpu.elementwise_inline_asm({lut4_pair_asm(bits, lane)!r}, args=[{words}], "
            f"constraints={CONSTRAINTS!r}, pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct({words}.shape, "
            "jnp.int32)])",
            f"    {p} = lax.bitcast_convert_type({p}, jnp.uint32)",
            "else:",
            f"    {p} = {halves[0]} | ({halves[1]} << 16)"]
