"""Low precision: formats (tables of 2^b values), bit packing and group quantization (NumPy), and
quantized parameters for JAX (``QuantizedArray``, ``quantize``, ``plan``, ``dequantize``, ``report``),
calibrated quantization (``calibrate``: GPTQ, scale search, bit budgets), and ``save``/``load``
of quantized pytrees as safetensors files."""

from fusec.lowprec.axes import contraction_axes
from fusec.lowprec.calibrate import CalibrationReport, MatrixResult, calibrate
from fusec.lowprec.formats import FLOAT_LAYOUTS, Format, fp_format, int_format, normal_float_table
from fusec.lowprec.kvcache import KVCache
from fusec.lowprec.packing import Packed, pack, plane_widths, unpack
from fusec.lowprec.qarray import (
    LeafPlan,
    QuantizedArray,
    QuantSpec,
    dequantize,
    is_quantized,
    plan,
    plan_summary,
    quantize,
    report,
)
from fusec.lowprec.quantize import QuantizedCodes, dequantize_codes, error_bound, quantize_codes
from fusec.lowprec.store import load, save

__all__ = ["FLOAT_LAYOUTS", "CalibrationReport", "Format", "KVCache", "LeafPlan", "MatrixResult", "Packed", "QuantSpec",
           "QuantizedArray", "QuantizedCodes", "calibrate", "contraction_axes", "dequantize", "dequantize_codes",
           "error_bound", "fp_format", "int_format", "is_quantized", "load", "normal_float_table", "pack", "plan",
           "plan_summary", "plane_widths", "quantize", "quantize_codes", "report", "save", "unpack"]
