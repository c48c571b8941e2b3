"""Kernel source that unpacks a [bk, bn] tile of a packed low-bit weight in registers.

Each power-of-two plane's words for the tile's rows are loaded once, repeated to one row per code
(broadcast + reshape), shifted by the code's lane and masked; the planes are ORed into codes, the
codes decoded (two's complement, zero-point, small-float bit fields, or, for NormalFloat and lookup
tables, a chain of selects over the table's values) and scaled by the tile's group scale. See fusec/lowprec/packing.py.
"""

from __future__ import annotations

from fusec.codegen.pallas_access import Access
from fusec.codegen.pallas_body import jnp_dtype, literal
from fusec.ir import LowBitType, Op, TensorType, parse_elem_type
from fusec.lowprec.formats import format_of, group_size
from fusec.lowprec.packing import WORD_BITS, plane_widths


def packed_part_rows(t: TensorType) -> list[int]:
    """Rows of each array a low-bit [K, N] value is stored as: planes, scales, zero-points."""
    assert isinstance(t.elem, LowBitType)
    k = t.shape[0]
    group = group_size(t.elem, k)
    k_pad = -(-k // WORD_BITS) * WORD_BITS
    rows = [k_pad * p // WORD_BITS for p in plane_widths(t.elem.bits)]
    return rows + [k // group] * (1 + int(t.elem.zero_point))


def unpack_tile(dq: Op, refs: list[Access], bk: int, bn: int, out: str) -> list[str]:
    """Lines (inside the K loop, step ``kk``) that leave the dequantized tile in ``out``; ``refs``
    are the planes', scales' and zero-points' accesses (rows sliced per step, columns masked where
    the column block overhangs)."""
    fmt = parse_elem_type(str(dq.attr("format")))
    assert isinstance(fmt, LowBitType)
    k = dq.attr("shape")[0]
    group = group_size(fmt, k)
    steps = -(-k // bk)
    lines = [f"codes = jnp.zeros(({bk}, {bn}), jnp.uint32)"]
    shift = 0
    for i, p in enumerate(plane_widths(fmt.bits)):
        per_word = WORD_BITS // p
        rows = bk // per_word
        lines += [
            f"words = {refs[i].load({0: (f'kk * {rows}', rows, steps * rows)})}",
            f"words = jnp.broadcast_to(words[:, None, :], ({rows}, {per_word}, {bn})).reshape({bk}, {bn})",
            f"lanes = (lax.broadcasted_iota(jnp.int32, ({bk}, {bn}), 0) % {per_word}).astype(jnp.uint32) * {p}",
            f"codes = codes | (((words >> lanes) & {2**p - 1}) << {shift})",
        ]
        shift += p
    n_planes = len(plane_widths(fmt.bits))
    row = "0" if group >= k else f"(kk * {bk}) // {group}"
    one_row = {0: (row, 1, ((steps - 1) * bk) // group + 1)}
    lines.append(f"scale = {refs[n_planes].load(one_row)}.astype(jnp.float32)")
    if fmt.family == "int":
        half, full = 2 ** (fmt.bits - 1), 2**fmt.bits
        lines += ["c = codes.astype(jnp.int32)", f"values = jnp.where(c >= {half}, c - {full}, c).astype(jnp.float32)"]
    elif fmt.family == "uint":
        lines.append(f"zero = {refs[n_planes + 1].load(one_row)}.astype(jnp.float32)")
        lines.append("values = codes.astype(jnp.float32) - zero")
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
        table = [float(v) for v in format_of(fmt, dq.attr("lut")).table]
        lines.append(f"values = jnp.full(({bk}, {bn}), {literal(table[0])}, jnp.float32)")
        lines += [f"values = jnp.where(codes == {c}, {literal(v)}, values)" for c, v in enumerate(table) if c]
    lines.append(f"{out} = (values * scale).astype({jnp_dtype(dq.result)})")
    return lines
