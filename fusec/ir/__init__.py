"""fusec's IR: types, values, ops, functions, modules; text printer and parser; verifier. No JAX here."""

from fusec.ir.builder import Builder
from fusec.ir.function import Function, Module, Op, Value
from fusec.ir.opdefs import OPDEFS, infer_result_types
from fusec.ir.parser import parse_module, parse_type
from fusec.ir.printer import format_op, print_function, print_module
from fusec.ir.tile_ops import TILE_OPS
from fusec.ir.tile_verify import ScalarIntervals, overhangs, verify_tile_program
from fusec.ir.tiling import KernelTiling
from fusec.ir.types import (
    PER_CHANNEL,
    DType,
    ElemType,
    ExtType,
    LowBitType,
    TensorType,
    dtype,
    parse_elem_type,
    tensor,
)
from fusec.ir.verify import verify_function, verify_module

__all__ = [
    "Builder", "DType", "ElemType", "ExtType", "Function", "KernelTiling", "LowBitType", "Module", "OPDEFS", "Op",
    "PER_CHANNEL", "ScalarIntervals", "TILE_OPS", "TensorType", "Value", "dtype", "format_op",
    "infer_result_types", "overhangs", "parse_elem_type", "parse_module", "parse_type", "print_function",
    "print_module", "tensor", "verify_function", "verify_module", "verify_tile_program",
]
