"""The verifier rejects malformed IR with messages naming the op and the operand."""

from __future__ import annotations

import pytest

from fusec.errors import VerifyError
from fusec.ir import Function, Module, Op, Value, parse_module, tensor, verify_module


def _func(body: str, params: str = "%a: f32[4,8], %b: f32[8,4]", results: str = "") -> str:
    return f"func @f({params}) -> ({results}) {{\n{body}\n  return\n}}\n"


_KERNEL_CALLEE = "func @g(%x: f32[4,8]) -> (f32[4,8]) {\n  %0 = neg %x : f32[4,8]\n  return %0\n}\n"


def _tiled(block: str, grid: str) -> str:
    return _func(f"  %0 = kernel %a {{block = {block}, callee = \"g\", grid = {grid}, kind = \"elementwise\", "
                 f"space = [4, 8], squeeze = []}} : f32[4,8]") + _KERNEL_CALLEE


MALFORMED = [
    ("elementwise shape mismatch", _func("  %0 = add %a, %b : f32[4,8]"),
     "op 'add'", "operand #1 %b has type f32[8,4], expected f32[4,8]"),
    ("elementwise dtype mismatch", _func("  %0 = mul %a, %a2 : f32[4,8]", "%a: f32[4,8], %a2: bf16[4,8]"),
     "op 'mul'", "operand #1 %a2 has type bf16[4,8]"),
    ("wrong declared result type", _func("  %0 = neg %a : f32[8,4]"),
     "op 'neg'", "declares result type(s) (f32[8,4]) but its operands and attributes give (f32[4,8])"),
    ("wrong arity", _func("  %0 = add %a : f32[4,8]"), "op 'add'", "takes 2 operands, got 1"),
    ("unknown opcode", _func("  %0 = frobnicate %a : f32[4,8]"), "op 'frobnicate'", "unknown opcode"),
    ("missing attribute", _func("  %0 = reshape %a : f32[32]"), "op 'reshape'", "missing attribute(s) shape"),
    ("reshape element count", _func("  %0 = reshape %a {shape = [5, 7]} : f32[5,7]"),
     "op 'reshape'", "operand #0 %a has 32 elements, cannot reshape to [5, 7]"),
    ("transpose not a permutation", _func("  %0 = transpose %a {perm = [0, 0]} : f32[4,4]"),
     "op 'transpose'", "perm=(0, 0) is not a permutation"),
    ("broadcast bad dims", _func("  %0 = broadcast %a {dims = [0, 1], shape = [4, 9]} : f32[4,9]"),
     "op 'broadcast'", "operand #0 %a dimension 1 of size 8 cannot broadcast to size 9"),
    ("reduce axis out of range", _func("  %0 = reduce %a {axes = [2], kind = \"sum\"} : f32[4,8]"),
     "op 'reduce'", "axes=[2] must list axes in [0, 2)"),
    ("reduce unknown kind", _func("  %0 = reduce %a {axes = [1], kind = \"mean\"} : f32[4]"),
     "op 'reduce'", "kind='mean' is not one of"),
    ("dot contraction mismatch",
     _func("  %0 = dot %a, %a {lhs_t = false, out_dtype = \"f32\", rhs_t = false} : f32[4,8]"),
     "op 'dot'", "operand #1 %a contracting size 4 differs from the lhs's 8"),
    ("compare result not bool", _func("  %0 = lt %a, %a : f32[4,8]"),
     "op 'lt'", "give (bool[4,8])"),
    ("select predicate type", _func("  %0 = select %a, %a, %a : f32[4,8]"),
     "op 'select'", "operand #0 %a predicate has type f32[4,8], expected bool or i32"),
    ("float op on ints", _func("  %0 = exp %i : i32[3]", "%i: i32[3]"),
     "op 'exp'", "operand #0 %i has type i32[3], expected a floating-point tensor"),
    ("slice out of bounds", _func("  %0 = slice %a {limit = [4, 9], start = [0, 0], strides = [1, 1]} : f32[4,9]"),
     "op 'slice'", "axis 1: slice 0:9:1 does not fit size 8"),
    ("constant value count", _func("  %0 = constant {dtype = \"f32\", shape = [3], value = [1.0, 2.0]} : f32[3]"),
     "op 'constant'", "holds 2 values for a tensor of 3 elements"),
    ("integer constant with a float value",
     _func("  %0 = constant {dtype = \"i32\", shape = [], value = 1.5} : i32[]"),
     "op 'constant'", "value 1.5 is not an integer, as a i32 constant needs"),
    ("dequantize with a missing plane",
     _func("  %0 = dequantize %p, %s {dtype = \"f32\", format = \"i3g32\", shape = [64, 8]} : f32[64,8]",
           "%p: u32[4,8], %s: bf16[2,8]"),
     "op 'dequantize'", "i3g32 takes 2 packed plane(s), scales (3 operands), got 2"),
    ("call to unknown function", _func("  %0 = call %a {callee = \"g\"} : f32[4,8]"),
     "op 'call'", "calls unknown function @g"),
    ("call with wrong types", _func("  %0 = call %b {callee = \"g\"} : f32[4,8]")
     + "func @g(%x: f32[4,8]) -> (f32[4,8]) {\n  return %x\n}\n",
     "op 'call'", "operand #0 %b has type f32[8,4], but @g takes f32[4,8]"),
    ("kernel grid does not cover its space", _tiled("[4, 4]", "[1, 1]"),
     "op 'kernel'", "kernel g: grid dimension 1 is 1, but 4-blocks cover the space's 8 in 2"),
    ("kernel block not a power of two", _tiled("[3, 5]", "[2, 2]"),
     "op 'kernel'", "kernel g: block dimension 0 is 3, not a power of two"),
]


@pytest.mark.parametrize("text,where,message", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_rejects_malformed_ir(text: str, where: str, message: str) -> None:
    module = parse_module(text)
    with pytest.raises(VerifyError) as info:
        verify_module(module)
    assert "in @f" in str(info.value)
    assert where in str(info.value)
    assert message in str(info.value), str(info.value)


def _v(name: str, *shape: int) -> Value:
    return Value(name, tensor("f32", *shape))


def test_rejects_use_before_definition() -> None:
    a, x, y = _v("a", 3), _v("x", 3), _v("y", 3)
    func = Function("f", (a,), (Op("neg", (x,), (y,)), Op("neg", (a,), (x,))), (y,))
    with pytest.raises(VerifyError, match=r"operand #0 %x is not defined before this op"):
        verify_module(Module((func,)))


def test_rejects_redefinition() -> None:
    a, x = _v("a", 3), _v("x", 3)
    func = Function("f", (a,), (Op("neg", (a,), (x,)), Op("neg", (a,), (x,))), (x,))
    with pytest.raises(VerifyError, match=r"result %x redefines a value"):
        verify_module(Module((func,)))


def test_rejects_operand_with_stale_type() -> None:
    a = _v("a", 3)
    func = Function("f", (a,), (Op("neg", (_v("a", 4),), (_v("x", 4),)),), ())
    with pytest.raises(VerifyError, match=r"operand #0 %a has type f32\[4\], but it was defined as f32\[3\]"):
        verify_module(Module((func,)))


def test_rejects_undefined_return_and_duplicate_function() -> None:
    a = _v("a", 3)
    with pytest.raises(VerifyError, match=r"returned value #0 %zz is not defined"):
        verify_module(Module((Function("f", (a,), (), (_v("zz", 3),)),)))
    f = Function("f", (a,), (), (a,))
    with pytest.raises(VerifyError, match=r"function @f is defined twice"):
        verify_module(Module((f, f)))


def test_accepts_well_formed_ir() -> None:
    verify_module(parse_module(_func("  %0 = transpose %b {perm = [1, 0]} : f32[4,8]\n  %1 = add %a, %0 : f32[4,8]")))
