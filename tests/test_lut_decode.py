"""4-bit lookup-table formats (nf4, a learned lut4) decoded in pairs by byte permutes
(fusec/codegen/lut_asm.py): the exact PTX text run by a NumPy emulator (tests/ptx_emu.py) against
the table for every code at every position, the kernels on their GPU tiles in both interpreters
(which decode by selects), and the sm_80/sm_90 compile (0 spills, the instructions per weight)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import fusec
from fusec import lowprec
from fusec.codegen.lut_asm import CONSTRAINTS, lut4_pair_asm, reference_pairs, table_bits16, table_registers
from fusec.codegen.triton.interpret import run_interpreted
from fusec.ir import parse_elem_type
from fusec.ir.tile_ops import pair_format_ok, pair_is_table
from fusec.lowprec.formats import normal_float_table
from fusec.runtime.triton_compile import compile_triton_kernel
from tests import ptx_emu
from tests.test_bounds import check_masks
from tests.test_splitk import GPU_TILES_INTERPRETED
from tests.test_triton_backend import _check_source_masks, _random

SMOKE = ("test_asm_decodes_every_code_at_every_position", "test_paired_table_gemv_matches_float64")
LEARNED = tuple(float(v) for v in np.sort(np.random.default_rng(1).normal(size=16)) / 2.5)


def _tables() -> dict[str, tuple[int, ...]]:
    rng = np.random.default_rng(7)
    # Random 16-bit patterns: every byte value's sign bit, in every table slot (prmt's sign mode).
    random_bits = tuple(int(v) for v in rng.integers(0, 2**16, 16))
    return {"nf4-bf16": table_bits16(normal_float_table(4), "bf16"),
            "nf4-f16": table_bits16(normal_float_table(4), "f16"),
            "learned-bf16": table_bits16(LEARNED, "bf16"), "random-patterns": random_bits}


def test_emulator_follows_the_ptx_manual() -> None:
    a, b = np.uint32(0x33221100), np.uint32(0x77665544)
    run = lambda asm, *x: int(ptx_emu.run(asm, "=r" + ",r" * len(x), *x)[0])  # noqa: E731
    assert run("prmt.b32 $0, $1, $2, 0x3210;", a, b) == 0x33221100
    assert run("prmt.b32 $0, $1, $2, 0x4567;", a, b) == 0x44556677
    # Bit 3 of a selector nibble replicates the chosen byte's sign bit.
    assert run("prmt.b32 $0, $1, $2, 0x1A98;", np.uint32(0x000080F0), b) == 0x8000FFFF
    assert run("lop3.b32 $0, $1, $2, $3, 0xea;", np.uint32(0xF0F0), np.uint32(0xFF00), np.uint32(0x000F)) == 0xF00F
    assert run("{\n.reg .b32 t;\nshr.u32 t, $1, 4;\nand.b32 $0, t, 0xFF;\n}", np.uint32(0xABCD)) == 0xBC
    lanes = np.arange(64, dtype=np.uint32)
    got = ptx_emu.run("mov.u32 $0, %lanemask_lt;", "=r,r", lanes, lanes=lanes % 32)[0]
    np.testing.assert_array_equal(got, (np.uint64(1) << (lanes % 32).astype(np.uint64)) - 1)
    with pytest.raises(ValueError, match="no instruction"):
        run("add.u32 $0, $1, 1;", a)
    with pytest.raises(ValueError, match="read before"):
        run("mov.b32 $0, t;", a)


def test_table_registers_hold_low_then_high_bytes() -> None:
    bits = tuple(range(0x0100, 0x1100, 0x0100))  # entry e: high byte e + 1, low byte 0
    regs = table_registers(tuple(b | e for e, b in enumerate(bits)))
    assert regs[:4] == (0x03020100, 0x07060504, 0x0B0A0908, 0x0F0E0D0C)
    assert regs[4:] == (0x04030201, 0x08070605, 0x0C0B0A09, 0x100F0E0D)


@pytest.mark.parametrize("table", sorted(_tables()))
def test_asm_decodes_every_code_at_every_position(table: str) -> None:
    """Each lane's PTX against the table: all 256 values of its byte (both codes), with random
    other bytes, and 4096 random words."""
    bits = _tables()[table]
    rng = np.random.default_rng(0)
    for lane in range(4):
        byte = np.arange(256, dtype=np.uint32)
        others = rng.integers(0, 2**32, 256, dtype=np.uint32) & ~np.uint32(0xFF << (8 * lane))
        words = np.concatenate([others | (byte << np.uint32(8 * lane)), rng.integers(0, 2**32, 4096, np.uint32)])
        (got,) = ptx_emu.run(lut4_pair_asm(bits, lane), CONSTRAINTS, words)
        np.testing.assert_array_equal(got, reference_pairs(words, bits)[:, lane], err_msg=f"lane {lane}")


def test_reference_pairs_are_the_table_rounded_once() -> None:
    table = normal_float_table(4)
    bits = table_bits16(table, "bf16")
    words = np.array([0x76543210, 0xFEDCBA98], np.uint32)
    pairs = reference_pairs(words, bits)
    halves = np.stack([pairs & 0xFFFF, pairs >> 16], -1).reshape(2, 8).astype(np.uint16)
    assert np.array_equal(halves.view(ml_dtypes.bfloat16).astype(np.float64),
                          table.astype(ml_dtypes.bfloat16).astype(np.float64).reshape(2, 8))
    # One rounding from float64: 1 + 2^-8 (+ a little) is no tie in float64, but is after float32.
    assert table_bits16([1 + 2**-8 + 2**-40] + [0.0] * 15, "bf16")[0] == 0x3F81
    assert table_bits16([1 + 2**-8] + [0.0] * 15, "bf16")[0] == 0x3F80  # a tie: the even pattern
    with pytest.raises(ValueError, match="overflow f16"):
        table_bits16([70000.0] + [0.0] * 15, "f16")
    with pytest.raises(ValueError, match="16 finite values"):
        table_bits16([0.0] * 15, "bf16")
    with pytest.raises(ValueError, match="lanes 0..3"):
        lut4_pair_asm(bits, 4)


def test_which_table_formats_pair() -> None:
    for text in ("nf4g128", "lut4g64"):
        assert pair_is_table(parse_elem_type(text)) and pair_format_ok(parse_elem_type(text), "bf16")
        assert pair_format_ok(parse_elem_type(text), "f16") and not pair_format_ok(parse_elem_type(text), "f32")
    for text in ("nf3g128", "lut8g128", "nf4"):  # two planes, 256 entries, no groups
        assert not pair_format_ok(parse_elem_type(text), "bf16"), text


def test_a_table_beyond_float16_keeps_the_general_decoder() -> None:
    """A learned table may hold values float16 cannot (the scale brings them back): no pairs."""
    w = jnp.asarray(np.random.default_rng(0).standard_normal((512, 200)) * 0.1, jnp.float16)
    wide = tuple(v * 1e6 for v in LEARNED)  # up to 5e5
    q = lowprec.quantize({"w": w}, lowprec.QuantSpec(4, 128, "lut", lut=wide))["w"]
    x = jnp.ones((3, 512), jnp.float16)
    ops = [o for o in _backend("pallas").lower(q, x).program.module.entry.ops if o.opcode == "kernel"]
    assert "gemv" in [o.attr("strategy") for o in ops] and "gemv-pairs" not in [o.attr("strategy") for o in ops]
    want = jax.jit(lambda q, x: x @ lowprec.dequantize(q))(q, x).astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(_backend("pallas")(q, x).astype(jnp.float32)), np.asarray(want),
                               rtol=1e-2, atol=1e-2)


def _weight(family: str, k: int, n: int, dtype=jnp.bfloat16, seed: int = 0, group: int = 128):
    w = jnp.asarray(np.random.default_rng(seed).standard_normal((k, n)) * 0.1, dtype)
    lut = LEARNED if family == "lut" else None
    return lowprec.quantize({"w": w}, lowprec.QuantSpec(4, group, family, lut=lut))["w"]


def _paired_exact(q, x) -> tuple[np.ndarray, np.ndarray]:
    """What the paired kernel computes exactly: x times the table rounded once to the weight's
    16-bit float, times the scales (float64), and the sum of |terms| (the float32 error scale)."""
    fmt = q.fmt
    bits = np.asarray(table_bits16(fmt.table, "bf16" if q.dtype == jnp.bfloat16 else "f16"), np.uint16)
    t16 = bits.view(ml_dtypes.bfloat16 if q.dtype == jnp.bfloat16 else np.float16).astype(np.float64)
    scale = np.repeat(np.asarray(q.scales.astype(jnp.float32), np.float64), q.group, axis=0)
    w = t16[_codes(q)] * scale
    xs = np.asarray(x, np.float64)
    return xs @ w, np.abs(xs) @ np.abs(w)


def _codes(q) -> np.ndarray:
    from fusec.lowprec.packing import Packed, unpack

    return unpack(Packed(tuple(np.asarray(p) for p in q.planes), q.fmt.bits, q.shape)).astype(np.int64)


def _backend(backend: str):
    return fusec.jit(lambda q, x: x @ q, backend=backend, interpret=True, passes=GPU_TILES_INTERPRETED)


@pytest.mark.parametrize("backend", ["pallas", "triton"])
@pytest.mark.parametrize("family,m,dtype", [("nf", 1, "bf16"), ("lut", 5, "bf16"), ("nf", 16, "f16"),
                                            pytest.param("lut", 3, "f16", marks=pytest.mark.slow),
                                            pytest.param("nf", 17, "bf16", marks=pytest.mark.slow)])
def test_paired_table_gemv_matches_float64(backend: str, family: str, m: int, dtype: str) -> None:
    """N = 200 and K = 640 divide no block. Each weight is its table value rounded once to the
    16-bit float, times the group scale after the group's sum: the output is within one ulp of
    that exact product, plus float32 accumulation; and near what jax.jit of the dequantized
    product gives (which rounds each value x scale to the 16-bit float instead)."""
    jdtype = jnp.bfloat16 if dtype == "bf16" else jnp.float16
    q = _weight(family, 640, 200, jdtype, seed=m)
    x = jnp.asarray(np.random.default_rng(m).standard_normal((m, 640)), jdtype)
    fused = _backend(backend)
    ops = [o for o in fused.lower(q, x).program.module.entry.ops if o.opcode == "kernel"]
    assert ("gemv-pairs" in [o.attr("strategy") for o in ops]) == (m <= 16)
    got = np.asarray(fused(q, x).astype(jnp.float32), np.float64)
    if m <= 16:
        exact, size = _paired_exact(q, x)
        ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(exact), 1e-30))) - (7 if dtype == "bf16" else 10))
        assert np.all(np.abs(got - exact) <= ulp + 1e-6 * size), np.max(np.abs(got - exact) / ulp)
    want = np.asarray(jax.jit(lambda q, x: x @ lowprec.dequantize(q))(q, x).astype(jnp.float32))
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
    if backend == "triton":  # every access inside its array, on random words (all codes)
        rng = np.random.default_rng(5)
        for spec in fused.lower(q, x).program.kernels.values():
            run_interpreted(spec.backend_kernel, *[_random(sig, rng) for sig in spec.backend_kernel.inputs],
                            check_bounds=True)


def test_one_hot_rows_give_the_table_rounded_once_times_the_scale() -> None:
    """x one-hot: each output is a weight, bf16(bf16(t) x s) bit for bit (the product of two
    bfloat16 values is exact in float32, so the kernel rounds once, to its bfloat16 output)."""
    q = _weight("nf", 256, 200, seed=3)
    rows = np.arange(5) * 37 % 256
    x = jnp.asarray(np.eye(256)[rows], jnp.bfloat16)
    got = np.asarray(_backend("pallas")(q, x).astype(jnp.float32))
    exact, _ = _paired_exact(q, x)
    np.testing.assert_array_equal(got, exact.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32))


@pytest.mark.parametrize("backend", ["pallas", "triton"])
def test_paired_table_gemv_compiles_with_byte_permutes(backend: str) -> None:
    """The GPU kernel's source carries the permutes; it lowers for cuda and compiles for sm_80 and
    sm_90 without spills, at under 6 thread-instructions per weight in the hot loop (the select
    chain it replaces: about 36)."""
    q = _weight("nf", 1024, 1000)
    x = jax.ShapeDtypeStruct((1, 1024), jnp.bfloat16)
    lowered = fusec.jit(lambda q, x: x @ q, backend=backend, interpret=False).lower(q, x)
    gpu = [s.for_gpu() or s for s in lowered.program.kernels.values()]
    assert any("prmt.b32" in s.source for s in gpu)
    if backend == "pallas":  # N = 1000 overhangs the N blocks: those accesses are masked
        assert check_masks(fusec.jit(lambda q, x: x @ q, backend="pallas", interpret=False), q, x) >= 1
    else:
        for s in gpu:
            _check_source_masks(s.backend_kernel)
    for arch in (80, 90):
        if backend == "pallas":
            resources = lowered.gpu_resources(arch)
        else:  # jax-triton's custom calls carry no Triton IR: compile the kernels' source
            resources = [compile_triton_kernel(s.backend_kernel, arch, sass=False).resources for s in gpu]
        assert resources and all(r.spills == 0 for r in resources), resources
    (kernel,) = [k for k in lowered.gpu_profile(90, "h100").kernels if k.per == "weight"]
    assert kernel.instructions_per_element < 6.0, kernel.instructions_per_element
