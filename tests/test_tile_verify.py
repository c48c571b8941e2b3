"""The tile level: the verifier's bounds proof and type rules reject what would touch memory outside
an array, leave an output unwritten, or break Triton's tile rules, naming the operand and dimension."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusec.errors import VerifyError
from fusec.ir import parse_module, print_module, verify_module
from tests.helpers import golden_cases

GOLDEN = Path(__file__).parent / "golden"

# A row kernel over f32[6, 24] with [8, 32] blocks: correct only with both dimensions masked.
_ROWS = """func @rows(%in0: f32[6,24], %out0: f32[6,24]) -> () {{
  %g0 = program_id {{axis = 0, size = {grid}}} : i32[]
  %c = constant {{dtype = "i32", shape = [], value = 0}} : i32[]
  %x = load %in0, %g0, %c {{block = [8, 32]{load_mask}}} : f32[8,32]
  %y = neg %x : f32[8,32]
  store %out0, %y, %g0, %c {{block = [8, 32]{store_mask}}}
  return
}}
"""
_MASKED = ", masked = [0, 1], other = 0.0"


def _rows(grid: int = 1, load_mask: str = _MASKED, store_mask: str = ", masked = [0, 1]") -> str:
    return _ROWS.format(grid=grid, load_mask=load_mask, store_mask=store_mask)


def test_masked_row_kernel_verifies() -> None:
    verify_module(parse_module(_rows()))


@pytest.mark.parametrize("load_mask, store_mask, operand, message", [
    ("", ", masked = [0, 1]", "load of %in0", "reads or writes past the end of dimension 0: blocks of 8 at block "
     "index up to 0 reach element 8, but %in0 has 6 there (f32[6,24]); mask dimension 0"),
    (", masked = [0], other = 0.0", ", masked = [0, 1]", "load of %in0", "past the end of dimension 1"),
    (_MASKED, ", masked = [1]", "store of %out0", "past the end of dimension 0"),
])
def test_rejects_reads_and_writes_past_an_array(load_mask: str, store_mask: str, operand: str, message: str) -> None:
    with pytest.raises(VerifyError) as e:
        verify_module(parse_module(_rows(load_mask=load_mask, store_mask=store_mask)))
    assert "tile program @rows" in str(e.value) and operand in str(e.value) and message in str(e.value)


def test_rejects_grid_that_does_not_cover_the_output() -> None:
    text = _rows().replace("f32[6,24]", "f32[20,24]")  # 20 rows, but one program of 8
    with pytest.raises(VerifyError, match=r"the grid does not cover %out0: along dimension 0 its blocks of 8 "
                                          r"reach elements 0..7 of 20"):
        verify_module(parse_module(text.replace("masked = [0, 1], other", "masked = [1], other")))


def test_rejects_a_block_index_before_the_array() -> None:
    text = _rows().replace('%c = constant {dtype = "i32", shape = [], value = 0}',
                           '%c = constant {dtype = "i32", shape = [], value = -1}')
    with pytest.raises(VerifyError, match="load of %in0: dimension 1 block index can be -1"):
        verify_module(parse_module(text))


def test_rejects_non_power_of_two_tiles_and_disagreeing_grids() -> None:
    with pytest.raises(VerifyError, match=r"%x has type f32\[6,32\]; tile values need power-of-two"):
        verify_module(parse_module(_rows().replace("[8, 32]", "[6, 32]").replace("f32[8,32]", "f32[6,32]")))
    two = _rows().replace("  %y = neg", "  %h = program_id {axis = 0, size = 2} : i32[]\n  %y = neg")
    with pytest.raises(VerifyError, match="program ids of axis 0 disagree on the grid's size"):
        verify_module(parse_module(two))


def test_type_rules_of_tile_ops() -> None:
    bad_acc = """func @f(%a: bf16[16,16], %o: bf16[16,16]) -> () {
  %c = constant {dtype = "i32", shape = [], value = 0} : i32[]
  %x = load %a, %c, %c {block = [16, 16]} : bf16[16,16]
  %acc = constant {dtype = "bf16", shape = [16, 16], value = 0.0} : bf16[16,16]
  %d = dot_acc %acc, %x, %x {lhs_t = false, rhs_t = false} : bf16[16,16]
  store %o, %d, %c, %c {block = [16, 16]}
  return
}
"""
    with pytest.raises(VerifyError, match="accumulates in bf16; bf16 products accumulate in f32"):
        verify_module(parse_module(bad_acc))
    no_fill = _rows(load_mask=", masked = [0, 1]")
    with pytest.raises(VerifyError, match="a masked load needs attribute other"):
        verify_module(parse_module(no_fill))
    wrong_index_count = _rows().replace("load %in0, %g0, %c {", "load %in0, %g0 {")
    with pytest.raises(VerifyError, match=r"takes one block index per dimension of f32\[6,24\] \(2\), got 1"):
        verify_module(parse_module(wrong_index_count))


def test_loop_bodies_are_proved_with_the_loop_index_range() -> None:
    text = (GOLDEN / "to-tile-matmul.fir").read_text().split("// EXPECT:")[1]
    verify_module(parse_module(text))
    # Thirty K steps of 32 reach far past K = 40: the body's unmasked-K version is rejected.
    broken = text.replace("trips = 2", "trips = 30").replace("masked = [0, 1], other = 0.0} : f32[16,32]",
                                                              "masked = [0], other = 0.0} : f32[16,32]")
    with pytest.raises(VerifyError, match="load of %in0 reads or writes past the end of dimension 1: blocks of 32 "
                                          "at block index up to 29"):
        verify_module(parse_module(broken))


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("to-tile*.fir")), ids=lambda p: p.stem)
def test_tile_golden_files_verify_and_round_trip(path: Path) -> None:
    for _, _, expected in golden_cases(path):
        module = parse_module(expected)
        verify_module(module)
        assert parse_module(print_module(module)) == module


def test_every_tile_op_has_a_golden_file() -> None:
    from fusec.ir import TILE_OPS

    text = "".join(p.read_text() for p in GOLDEN.glob("to-tile*.fir"))
    missing = [op for op in TILE_OPS if f" {op} " not in text]
    assert not missing, missing


# A fixup's end: count this program's arrival at its tile, store only where it is the last of 2.
_ARRIVE = """func @fix(%in0: f32[8,32], %out0: f32[8,32], %cnt: i32[{counters}]) -> () {{
  %g0 = program_id {{axis = 0, size = 2}} : i32[]
  %c = constant {{dtype = "i32", shape = [], value = 0}} : i32[]
  %one = constant {{dtype = "i32", shape = [], value = 1}} : i32[]
  %x = load %in0, %c, %c {{block = [8, 32]}} : f32[8,32]
  barrier {{scope = "cta"}}
  %n = arrive %cnt, %g0 : i32[]
  %last = eq %n, %one : bool[]
  store %out0, %x, %c, %c, %last {{block = [8, 32], when = true}}
  return
}}
"""


def test_arrival_counts_and_predicated_stores_verify_and_print() -> None:
    module = parse_module(_ARRIVE.format(counters=2))
    verify_module(module)
    assert parse_module(print_module(module)) == module


def test_rejects_an_arrival_past_its_counters() -> None:
    with pytest.raises(VerifyError, match=r"arrive at %cnt\[%g0\]: the index \(\(0, 1\)\) is not proven within its "
                                          r"1 counters"):
        verify_module(parse_module(_ARRIVE.format(counters=1)))
