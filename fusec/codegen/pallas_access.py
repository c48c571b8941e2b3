"""How a Pallas kernel addresses one array, and the masks that keep it inside that array.

Pallas's Triton lowering never masks a load or store by itself, while interpret mode pads partial
blocks: a block that overhangs its array reads and writes out of bounds on a GPU and looks right on
a CPU. Every access fusec generates therefore goes through :class:`Access`, which knows each block
dimension's size, block index and array size, and masks exactly the dimensions whose block (or
in-kernel slice) can reach past the array's end.
"""

from __future__ import annotations

from dataclasses import dataclass

from fusec.errors import FusecError
from fusec.passes.views import View, block_spec_through_view

BlockDimSpec = tuple[int | None, int | None]


@dataclass(frozen=True)
class Access:
    """An array read or written blockwise: per array dimension, the block size (None: squeezed, one
    element per program), the block index as a Python expression of the grid variables, and the
    array's size along that dimension."""

    ref: str
    blocks: tuple[int | None, ...]
    index: tuple[str, ...]
    sizes: tuple[int, ...]

    @property
    def spec(self) -> str:
        """The ``pl.BlockSpec`` source; its index map takes the grid variables ``g0, g1, ...``."""
        return f"pl.BlockSpec({_tuple(self.blocks)}, lambda *g: {_tuple(self.index)})"

    @property
    def kept(self) -> list[int]:
        """Array dimensions present in the block value (the squeezed ones dropped)."""
        return [d for d, b in enumerate(self.blocks) if b is not None]

    def overhanging(self, slices: dict[int, tuple[str, int, int]] | None = None) -> list[int]:
        """Kept dimensions (positions in the block value) whose elements can lie past the array's end.

        ``slices`` maps a block-value position to an in-kernel slice (start expression, length,
        the most elements any start reaches: start + length at the last step)."""
        slices = slices or {}
        out = []
        for pos, d in enumerate(self.kept):
            block, size = self.blocks[d], self.sizes[d]
            assert block is not None
            if pos in slices:
                reach = slices[pos][2]
                if self.index[d] != "0" or reach > size:
                    out.append(pos)
            elif size % block:
                out.append(pos)
        return out

    def mask(self, slices: dict[int, tuple[str, int, int]] | None = None) -> str | None:
        """A boolean expression over the accessed block (or slice), true where it lies inside the
        array; None when no element can fall outside."""
        slices = slices or {}
        kept = self.kept
        shape = tuple(slices[p][1] if p in slices else self.blocks[d] for p, d in enumerate(kept))
        terms = []
        for pos in self.overhanging(slices):
            d = kept[pos]
            start = f"({self.index[d]}) * {self.blocks[d]}" if self.index[d] != "0" else ""
            if pos in slices:
                start = f"{start} + {slices[pos][0]}" if start else slices[pos][0]
            offset = f" + {start}" if start else ""
            terms.append(f"(lax.broadcasted_iota(jnp.int32, {shape}, {pos}){offset} < {self.sizes[d]})")
        return " & ".join(terms) if terms else None

    def load(self, slices: dict[int, tuple[str, int, int]] | None = None) -> str:
        """The load of the block (or of ``slices`` of it), masked where it can overhang."""
        target = self.ref
        if slices:
            parts = [f"pl.ds({slices[p][0]}, {slices[p][1]})" if p in slices else ":" for p in range(len(self.kept))]
            target = f"{self.ref}.at[{', '.join(parts)}]"
        mask = self.mask(slices)
        if mask is None:
            return f"{target}[...]"
        return f"plgpu.load({target}, mask={mask}, other=jnp.zeros((), {self.ref}.dtype))"

    def store(self, value: str) -> str:
        mask = self.mask()
        if mask is None:
            return f"{self.ref}[...] = {value}"
        return f"plgpu.store({self.ref}, {value}, mask={mask})"


def _tuple(items: tuple | list) -> str:
    return "(" + "".join(f"{x}, " for x in items) + ")"


def access(ref: str, dims: list[BlockDimSpec], shape: tuple[int, ...], view: View | None, output: bool) -> Access:
    """How ``ref`` holds a value of ``shape`` read (or, ``output``, written) with ``dims``,
    directly or through the folded ``view``."""
    if view is None:
        return Access(ref, tuple(b for b, _ in dims), tuple(f"g[{a}]" if a is not None else "0" for _, a in dims),
                      tuple(shape))
    through = block_spec_through_view(view, shape, dims, output)
    if through is None:
        raise FusecError(f"a folded view {view} cannot be addressed blockwise")
    blocks, index = through
    exprs = tuple(" + ".join([str(const)] * bool(const or not terms)
                             + [f"{c} * g[{a}]" if c != 1 else f"g[{a}]" for c, a in terms]) for const, terms in index)
    return Access(ref, tuple(blocks), exprs, tuple(view.base_shape))
