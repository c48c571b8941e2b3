"""Runtime: compiled programs and how they run inside JAX."""

from fusec.runtime import partitioning  # noqa: F401  (registers the partitioned kernel lowering)
from fusec.runtime.program import Fallback, Program, build_program

__all__ = ["Fallback", "Program", "build_program"]
