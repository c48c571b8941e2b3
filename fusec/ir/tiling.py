"""A kernel's tiling as one frozen, checked object (its text form is the kernel op's attributes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TILING_ATTRS = ("block", "grid", "squeeze", "bk", "num_warps", "num_stages", "strategy", "split")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class KernelTiling:
    """The block of the iteration space ``space`` each program computes, the grid of programs,
    the block dimensions squeezed out of tile values, the matmul's K step and launch parameters."""

    kind: str
    space: tuple[int, ...]
    block: tuple[int, ...]
    grid: tuple[int, ...]
    squeeze: tuple[int, ...] = ()
    bk: int | None = None
    num_warps: int = 4
    num_stages: int = 2
    strategy: str | None = None
    split: int = 1

    def __post_init__(self) -> None:
        self.check_invariants()

    def check_invariants(self) -> None:
        """Raises ValueError unless the grid covers the space exactly with power-of-two blocks."""
        space, block, grid = self.space, self.block, self.grid
        if not len(space) == len(block) == len(grid):
            raise ValueError(f"space {list(space)}, block {list(block)} and grid {list(grid)} differ in rank")
        for d, (n, b, g) in enumerate(zip(space, block, grid)):
            if b < 1 or b & (b - 1):
                raise ValueError(f"block dimension {d} is {b}, not a power of two "
                                 "(every Triton tile dimension must be one)")
            if g != cdiv(n, b):
                raise ValueError(f"grid dimension {d} is {g}, but {b}-blocks cover the space's {n} in {cdiv(n, b)}")
        for d in self.squeeze:
            if not 0 <= d < len(block) or block[d] != 1:
                raise ValueError(f"squeezed dimension {d} must have a block of 1")
        if self.bk is not None and (self.bk < 1 or self.bk & (self.bk - 1)):
            raise ValueError(f"K step bk = {self.bk} is not a power of two")
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"num_warps = {self.num_warps} and num_stages = {self.num_stages} must be positive")
        if self.split < 1 or (self.split > 1 and (self.kind != "matmul" or self.bk is None)):
            raise ValueError(f"split = {self.split}: only a matmul's K loop splits, into a positive number of parts")

    @staticmethod
    def from_attrs(attrs: dict[str, Any]) -> KernelTiling:
        """The tiling a kernel op's attributes spell; raises ValueError if they are inconsistent."""
        missing = [k for k in ("kind", "space", "block", "grid") if k not in attrs]
        if missing:
            raise ValueError(f"a tiled kernel needs attribute(s) {', '.join(missing)}")
        return KernelTiling(str(attrs["kind"]), tuple(attrs["space"]), tuple(attrs["block"]), tuple(attrs["grid"]),
                            tuple(attrs.get("squeeze", ())), attrs.get("bk"), int(attrs.get("num_warps", 4)),
                            int(attrs.get("num_stages", 2)), attrs.get("strategy"),
                            int(attrs.get("split", 1)))

    def as_attrs(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {"block": self.block, "grid": self.grid, "squeeze": self.squeeze,
                                 "num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.bk is not None:
            attrs["bk"] = self.bk
        if self.strategy is not None:
            attrs["strategy"] = self.strategy
        if self.split > 1:
            attrs["split"] = self.split
        return attrs

    @property
    def launch_grid(self) -> tuple[int, ...]:
        """The grid programs are launched on: ``grid``, then the split-K axis when there is one."""
        return self.grid + ((self.split,) if self.split > 1 else ())

    @property
    def tile_shape(self) -> tuple[int, ...]:
        """The shape of a full tile value: the block less its squeezed dimensions."""
        return tuple(b for d, b in enumerate(self.block) if d not in self.squeeze)

    def tile_axis(self, d: int) -> int:
        """Position of space dimension ``d`` in a full tile value."""
        return d - sum(1 for s in self.squeeze if s < d)
