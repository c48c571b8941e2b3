"""The textual IR: round trips (property-based and over golden files) and syntax errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusec.errors import FusecSyntaxError
from fusec.ir import parse_elem_type, parse_module, print_module, verify_module
from tests.helpers import golden_cases
from tests.ir_strategies import low_bit_types, modules

GOLDEN = sorted((Path(__file__).parent / "golden").glob("*.fir"))


@given(modules())
def test_print_parse_round_trip(module) -> None:
    verify_module(module)
    text = print_module(module)
    back = parse_module(text)
    assert back == module
    assert print_module(back) == text


@given(low_bit_types)
def test_low_bit_type_names_round_trip(t) -> None:
    assert parse_elem_type(str(t)) == t


@pytest.mark.parametrize("name", ["f32", "bf16", "i4", "u8", "bool", "f8e4m3fn", "i3g128", "i3g128p", "u4g64z",
                                  "e2m1g32", "nf4gc", "lut3", "e5m2", 'opaque<"key<fry>">'])
def test_elem_type_names(name: str) -> None:
    assert str(parse_elem_type(name)) == name


@pytest.mark.parametrize("name", ["f33", "i9", "e3m3", "nf0", "i3g", "i3g0", "lut9g32", "i4g128p", "i3g128pz"])
def test_bad_elem_type_names(name: str) -> None:
    with pytest.raises(ValueError):
        parse_elem_type(name)


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.name)
def test_golden_files_round_trip(path: Path) -> None:
    for _, given_text, expected_text in golden_cases(path):
        for text in (given_text, expected_text):
            module = parse_module(text, str(path))
            verify_module(module)
            assert parse_module(print_module(module)) == module


SYNTAX_ERRORS = [
    ("func @f() -> () {\n  %1 = add %2 : f32[]\n  return\n}", 2, 12, "use of undefined value %2"),
    ("func @f(%a: f32[]) -> () {\n  %1 = add %a, %a : f32[] }", 2, 27, "unexpected"),
    ("func @f(%a: f32[]) -> () {\n  %1 = add %a, %a : f33[]\n  return\n}", 2, 21, "unknown element type 'f33'"),
    ("func @f(%a: f32[]) -> () {\n  %a = neg %a : f32[]\n  return\n}", 2, 3, "defined twice"),
    ("func @f(%a: f32[]) -> (f32[]) {\n  return\n}", 2, 3, "returns () but declares (f32[])"),
    ("func @f(%a: f32[]) -> () {\n  %1, %2 = neg %a : f32[]\n  return\n}", 2, 12, "declares 2 result(s) but 1"),
    ("func @f(%a: f32[]) -> () {\n  %1 = neg %a {x = 1, x = 2} : f32[]\n  return\n}", 2, 23, "given twice"),
    ("func @f() -> () {\n  return\n}\nfunc @f() -> () {\n  return\n}", 4, 6, "defined twice"),
    ("", 1, 1, "no function"),
    ("func @f() -> () {\n  %1 = iota {shape = [3} : i32[3]\n  return\n}", 2, 24, "unexpected"),
]


@pytest.mark.parametrize("text,line,column,message", SYNTAX_ERRORS)
def test_syntax_errors_have_positions(text: str, line: int, column: int, message: str) -> None:
    with pytest.raises(FusecSyntaxError) as info:
        parse_module(text, "t.fir")
    assert (info.value.line, info.value.column) == (line, column), str(info.value)
    assert message in str(info.value)
    assert str(info.value).startswith(f"t.fir:{line}:{column}:")


@given(st.text(max_size=60))
def test_garbage_never_crashes_the_parser(text: str) -> None:
    try:
        parse_module(text)
    except FusecSyntaxError:
        pass
