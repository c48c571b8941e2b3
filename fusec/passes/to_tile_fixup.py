"""The serial split-K fixup at the end of a split GEMV program (``to-tile``, fusec/passes/to_tile.py)."""

from __future__ import annotations

from fusec.ir import KernelTiling, TensorType, Value
from fusec.ir.types import BOOL, F32, I32
from fusec.passes.tile_builder import SCALAR, ArrayMapping, TileBuilder


def split_k_fixup(b: TileBuilder, t: KernelTiling, shape: tuple[int, ...], mapping: ArrayMapping,
                  partial: Value) -> tuple[Value, Value]:
    """The end of a split-K program whose output needs its whole sum (a cast follows): add the
    ``partial`` sum into an f32 workspace, wait for the program's threads (a barrier), count this
    program's arrival at its output tile (an atomic that returns the old count), and reload the
    finished sum where the count says this program is the last. Returns (that sum, the "last"
    predicate); the workspace and counters are the program's last two arrays (zeroed by the
    caller, see fusec/codegen)."""
    ws = b.param("ws", TensorType(F32, shape))
    tiles = 1
    for g in t.grid:
        tiles *= g
    counters = b.param("arrivals", TensorType(I32, (tiles,)))
    indices = [b.index(e) for e in mapping.index]
    b.access("atomic_add", ws, indices, mapping.blocks, ws.type, partial, relaxed=True)
    b.emit("barrier", [], None, "sync", scope="cta")
    tile = b.program_id(0)
    for axis, g in enumerate(t.grid[1:], 1):  # the output tile's index, row-major over the grid
        tile = b.value("add", [b.value("mul", [tile, b.const(g)], SCALAR, "i"), b.program_id(axis)], SCALAR, "tile")
    arrived = b.value("arrive", [counters, tile], SCALAR, "arrived")
    last = b.value("eq", [arrived, b.const(t.split - 1)], TensorType(BOOL, ()), "last")
    total = b.access("load", ws, indices, mapping.blocks, ws.type, hint="total", when=last)
    assert total is not None
    return total, last
