"""The default pass pipeline, as one explicit ordered list per backend, and pass-level logs
through ``absl.logging`` under a verbosity flag (``FUSEC_VERBOSITY`` or absl's ``--verbosity``)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import logging

from fusec.ir import Module
from fusec.passes import Pass, parse_pipeline
from fusec.passes.tiling import Tile

DEFAULT_PIPELINE: tuple[str, ...] = ("inline", "canonicalize", "fold-constants", "cse", "dce")
# Kernel backends add fusion and tiling (with the tile target chosen by where kernels run).
# split-epilogue moves skinny low-bit matmuls' epilogues out (so their K loop can split across
# programs); the second fuse makes those epilogues kernels of their own.
# recognize-attention makes each softmax(Q K^T) V one flash-attention kernel before fuse sees it.
KERNEL_PASSES: tuple[str, ...] = ("sink-reshapes", "cse", "dce", "recognize-attention", "split-decode",
                                  "dce", "fuse", "dce",
                                  "split-epilogue", "fuse", "dce")


def resolve_pipeline(passes: str | Sequence[str | Pass] | None, backend: str = "xla",
                     interpret: bool = True, device: str = "") -> list[Pass]:
    """``None`` gives the default pipeline for ``backend``; otherwise a pipeline string or list.
    ``device``: the GPU whose autotuned configs GPU tiles take ("" for the static model's)."""
    if passes is not None:
        return parse_pipeline(passes)
    names: list[str | Pass] = list(DEFAULT_PIPELINE)
    if backend in ("pallas", "triton"):
        tile = Tile(target="interpret" if interpret else "gpu", device=device)
        names += [*KERNEL_PASSES, tile, "fold-views", "dce", "to-tile"]
    return parse_pipeline(names)


def log_level() -> int | None:
    """The absl level pass logs go out at, or None when they are off: ``FUSEC_VERBOSITY=1`` logs
    them as warnings, so they show with no logging set up (as ``jax_log_compiles`` does); otherwise
    absl's own verbosity 1 or more (``--verbosity=1``, ``absl.logging.set_verbosity(1)``) logs them
    at vlog level 1."""
    try:
        if int(os.environ.get("FUSEC_VERBOSITY", "0") or 0) >= 1:
            return logging.WARNING
    except ValueError:
        pass
    return 1 if logging.vlog_is_on(1) else None


def log_pass(program: str, stage: str, module: Module, seconds: float) -> None:
    """Logs one pass (or the frontend, or codegen) of ``program``: its name, time and op count."""
    level = log_level()
    if level is None:
        return
    ops = sum(len(f.ops) for f in module.functions)
    kernels = sum(op.opcode == "kernel" for f in module.functions for op in f.ops)
    logging.log(level, "fusec %s: %-16s %9.2f ms %6d ops %4d kernels", program, stage, seconds * 1e3, ops, kernels)
