"""jaxpr -> IR: one rule per primitive; unknown primitives become opaque ops run by XLA."""

from fusec.frontend.jaxpr_to_ir import FrontendResult, ParamSource, jaxpr_to_module
from fusec.frontend.rules import RULES, NoRule, register

__all__ = ["FrontendResult", "NoRule", "ParamSource", "RULES", "jaxpr_to_module", "register"]
