"""What fusion may put in a kernel: the target's types, ranks and reducible axes, and whether a
value has a block in a kernel's iteration space (shared by the fusion pass and its users)."""

from __future__ import annotations

from fusec.ir import DType, Op
from fusec.passes.target import PALLAS_TRITON

# What kernels can hold, from the target description (one target today: Pallas-Triton).
TARGET = PALLAS_TRITON
KERNEL_ELEMENTWISE = TARGET.elementwise
KIND_PRIORITY = {"matmul": 0, "reduction": 1, "elementwise": 2}


def types_ok(op: Op) -> bool:
    for v in (*op.operands, *op.results):
        if not (isinstance(v.type.elem, DType) and v.type.elem.name in TARGET.dtypes):
            return False
        if v.type.elem.name == "bool" and op.opcode not in TARGET.bool_ops and v in op.operands:
            return False
    return True


def space_ok(shape: tuple[int, ...]) -> bool:
    return 1 <= len(shape) <= TARGET.max_rank and all(d > 0 for d in shape)


def clonable(op: Op | None) -> bool:
    """Splat constants and iotas: cheaper to recompute in each kernel than to load."""
    if op is None:
        return False
    return op.opcode == "iota" or (op.opcode == "constant" and not isinstance(op.attr("value"), tuple))


def row_shape(space: tuple[int, ...], reduce_axes: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a reduction kernel's row values: the space less its reduced axes."""
    return tuple(n for d, n in enumerate(space) if d not in reduce_axes)


def fits(shape: tuple[int, ...], space: tuple[int, ...], rows: bool, reduce_axes: tuple[int, ...] | None = None
         ) -> bool:
    """Whether a value of ``shape`` has a block in ``space``: same rank with each dimension 1 or the
    space's, or (``rows``) the space less its reduced axes (its last one unless given)."""
    if len(shape) == len(space):
        return all(a in (1, b) for a, b in zip(shape, space))
    return rows and shape == row_shape(space, reduce_axes if reduce_axes is not None else (len(space) - 1,))


# Reduced axes of a kernel hold whole in one block: at most this many elements of them.
MAX_REDUCED_ELEMENTS = 4096


def reducible(space: tuple[int, ...], axes: tuple[int, ...]) -> bool:
    if not axes or len(axes) == len(space) or list(axes) != sorted(axes):
        return False
    extent = 1
    for d in axes:
        extent *= 1 << max(0, space[d] - 1).bit_length()
    return extent <= MAX_REDUCED_ELEMENTS
