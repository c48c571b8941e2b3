"""The default pass pipeline, as one explicit ordered list per backend."""

from __future__ import annotations

from collections.abc import Sequence

from fusec.passes import Pass, parse_pipeline

DEFAULT_PIPELINE: tuple[str, ...] = ("inline", "canonicalize", "fold-constants", "cse", "dce")
# Kernel backends add fusion and tiling (with the tile target chosen by where kernels run).
# split-epilogue moves skinny low-bit matmuls' epilogues out (so their K loop can split across
# programs); the second fuse makes those epilogues kernels of their own.
KERNEL_PASSES: tuple[str, ...] = ("sink-reshapes", "cse", "dce", "fuse", "dce", "split-epilogue", "fuse", "dce")


def resolve_pipeline(passes: str | Sequence[str | Pass] | None, backend: str = "xla",
                     interpret: bool = True) -> list[Pass]:
    """``None`` gives the default pipeline for ``backend``; otherwise a pipeline string or list."""
    if passes is not None:
        return parse_pipeline(passes)
    names = list(DEFAULT_PIPELINE)
    if backend == "pallas":
        tile = "tile{target=%s}" % ("interpret" if interpret else "gpu")
        names += [*KERNEL_PASSES, tile, "fold-views", "dce", "to-tile"]
    return parse_pipeline(names)
