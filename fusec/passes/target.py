"""What a kernel target can hold: the ops, dtypes, reduction kinds and tile limits that ``fuse``
and ``tile`` read (instead of copies of one backend's limits in each pass)."""

from __future__ import annotations

from dataclasses import dataclass

from fusec.ir.opdefs import OPDEFS


@dataclass(frozen=True)
class Target:
    """A kernel target. ``elementwise``: the elementwise opcodes a kernel may hold; ``bool_ops``:
    the ones that take bool operands; ``dtypes``/``dot_dtypes``: element types of kernel values
    and of matmul operands; ``reduce_kinds``: in-kernel reductions; ``max_rank``: iteration-space
    rank; ``pow2_tiles``: whether every tile dimension must be a power of two; ``min_dot_tile``:
    the smallest matmul tile dimension."""

    name: str
    elementwise: frozenset[str]
    bool_ops: frozenset[str]
    dtypes: frozenset[str]
    dot_dtypes: frozenset[str]
    reduce_kinds: frozenset[str]
    max_rank: int = 4
    pow2_tiles: bool = True
    min_dot_tile: int = 16


# Pallas's Triton lowering (checked by lowering each op for cuda): lgamma, digamma and round have no
# lowering, and popcount/clz on uint32 fail to compile in triton 3.9, so they stay with XLA; erf and
# erfc have none either, and codegen writes them out (pallas_special); there is no reduce_prod.
PALLAS_TRITON = Target(
    name="pallas-triton",
    elementwise=frozenset(name for name, d in OPDEFS.items() if d.kind == "elementwise")
    - {"lgamma", "digamma", "round", "population_count", "clz"},
    bool_ops=frozenset({"and", "or", "xor", "not", "eq", "ne", "select", "convert", "broadcast"}),
    dtypes=frozenset({"f32", "bf16", "f16", "i8", "i16", "i32", "u8", "u16", "u32", "bool"}),
    dot_dtypes=frozenset({"f32", "bf16", "f16"}),
    reduce_kinds=frozenset({"sum", "max", "min"}),
)
# fusec's own Triton source kernels: the same ops as Pallas's Triton lowering (fusion reads one
# target today, and the Triton writer covers every op of it); libdevice gives the special functions.
TRITON = Target(
    name="triton",
    elementwise=PALLAS_TRITON.elementwise,
    bool_ops=PALLAS_TRITON.bool_ops,
    dtypes=PALLAS_TRITON.dtypes,
    dot_dtypes=PALLAS_TRITON.dot_dtypes,
    reduce_kinds=PALLAS_TRITON.reduce_kinds,
)
TARGETS = {PALLAS_TRITON.name: PALLAS_TRITON, TRITON.name: TRITON}
