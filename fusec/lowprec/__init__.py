"""Low precision: formats (tables of 2^b values), bit packing and group quantization (NumPy), and
quantized parameters for JAX (``QuantizedArray``, ``quantize``, ``dequantize``, ``report``)."""

from fusec.lowprec.formats import FLOAT_LAYOUTS, Format, fp_format, int_format, normal_float_table
from fusec.lowprec.packing import Packed, pack, plane_widths, unpack
from fusec.lowprec.qarray import QuantizedArray, QuantSpec, dequantize, is_quantized, quantize, report
from fusec.lowprec.quantize import QuantizedCodes, dequantize_codes, error_bound, quantize_codes

__all__ = ["FLOAT_LAYOUTS", "Format", "Packed", "QuantSpec", "QuantizedArray", "QuantizedCodes", "dequantize",
           "is_quantized", "quantize", "report", "dequantize_codes", "error_bound", "fp_format",
           "int_format", "normal_float_table", "pack", "plane_widths", "quantize_codes", "unpack"]
