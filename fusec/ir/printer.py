"""The textual form of the IR. ``parse(print_module(m)) == m`` for every well-formed module.

    func @main(%x: f32[8,16], %b: f32[16]) -> (f32[8,16]) {
      %0 = broadcast %b {dims = [1], shape = [8, 16]} : f32[8,16]
      %1 = add %x, %0 : f32[8,16]
      return %1
    }
"""

from __future__ import annotations

import json
import math

from fusec.ir.function import Attr, Function, Module, Op


def format_attr(value: Attr) -> str:
    """Attribute text: ints, floats (always with a '.', 'e', 'inf' or 'nan'), true/false, strings, lists."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "-nan" if math.copysign(1.0, value) < 0 else "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(format_attr(v) for v in value) + "]"


def format_op(op: Op) -> str:
    """One op on one line, without indentation."""
    text = ""
    if op.results:
        text = ", ".join(str(r) for r in op.results) + " = "
    text += op.opcode
    if op.operands:
        text += " " + ", ".join(str(v) for v in op.operands)
    if op.attrs:
        text += " {" + ", ".join(f"{k} = {format_attr(v)}" for k, v in op.attrs) + "}"
    if op.results:
        text += " : " + ", ".join(str(r.type) for r in op.results)
    return text


def print_function(func: Function) -> str:
    params = ", ".join(f"{p}: {p.type}" for p in func.params)
    results = ", ".join(str(t) for t in func.result_types)
    lines = [f"func @{func.name}({params}) -> ({results}) {{"]
    lines += ["  " + format_op(op) for op in func.ops]
    lines.append("  return" + (" " + ", ".join(str(v) for v in func.returns) if func.returns else ""))
    lines.append("}")
    return "\n".join(lines)


def print_module(module: Module) -> str:
    """The module's text; the entry function comes first."""
    return "\n\n".join(print_function(f) for f in module.functions) + "\n"
