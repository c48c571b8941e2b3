"""fusec: a kernel-fusion compiler for JAX."""

from fusec import errors, lowprec
from fusec.api import GPU_CUSTOM_CALLS, FusecFunction, Lowered, export_disabled_checks, inspect, jit
from fusec.errors import FusecError, FusecSyntaxError, Unsupported, VerifyError
from fusec.pipeline import DEFAULT_PIPELINE

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PIPELINE", "GPU_CUSTOM_CALLS", "FusecError", "FusecFunction", "FusecSyntaxError", "Lowered",
    "Unsupported", "VerifyError", "errors", "export_disabled_checks", "inspect", "jit", "lowprec",
]
