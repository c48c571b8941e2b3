"""IR -> IR passes. Importing this package registers every pass by name. No JAX here."""

from fusec.passes import (  # noqa: F401  (registers the passes)
    attention,
    canonicalize,
    cse,
    dce,
    decode_split,
    fold_constants,
    fusion,
    inline,
    sink_reshapes,
    split_epilogue,
    tiling,
    to_tile,
    views,
)
from fusec.passes.base import PASSES, Pass, PassManager, parse_pipeline, register_pass

__all__ = ["PASSES", "Pass", "PassManager", "parse_pipeline", "register_pass"]
