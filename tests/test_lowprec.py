"""Low-bit formats, packing and group quantization (NumPy ground truth)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusec.lowprec import (
    FLOAT_LAYOUTS,
    Format,
    dequantize_codes,
    error_bound,
    fp_format,
    normal_float_table,
    pack,
    quantize_codes,
    unpack,
)

# QLoRA's published NF4 values.
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]
ML_DTYPES = {"e2m1": ml_dtypes.float4_e2m1fn, "e2m3": ml_dtypes.float6_e2m3fn, "e3m2": ml_dtypes.float6_e3m2fn,
             "e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}


def all_formats() -> list[Format]:
    out = [Format("int", b) for b in range(1, 9)] + [Format("uint", b) for b in range(1, 9)]
    out += [fp_format(layout) for layout in FLOAT_LAYOUTS] + [Format("nf", b) for b in range(2, 9)]
    out += [Format("lut", b, lut=tuple(np.linspace(-1, 1, 2**b) ** 3)) for b in (1, 3, 5)]
    return out


def test_normal_float_4_is_qlora_nf4() -> None:
    np.testing.assert_allclose(normal_float_table(4), NF4, atol=2e-7)


@pytest.mark.parametrize("layout", list(FLOAT_LAYOUTS))
def test_small_floats_round_like_ml_dtypes(layout: str) -> None:
    fmt = fp_format(layout)
    values = fmt.finite_values
    midpoints = (values[1:] + values[:-1]) / 2  # exact ties: round half to even
    rng = np.random.default_rng(0)
    x = np.concatenate([midpoints, values, rng.uniform(-fmt.max_abs, fmt.max_abs, 5000)])
    np.testing.assert_array_equal(fmt.decode(fmt.encode(x)), x.astype(ML_DTYPES[layout]).astype(np.float64))


@pytest.mark.parametrize("fmt", all_formats(), ids=lambda f: f"{f.family}{f.bits}{f.layout or ''}")
def test_every_code_round_trips(fmt: Format) -> None:
    table = fmt.table
    finite = np.flatnonzero(np.isfinite(table))
    assert np.array_equal(fmt.decode(fmt.encode(table[finite])), table[finite])


@given(st.sampled_from(all_formats()), st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=50))
def test_encode_picks_a_nearest_value(fmt: Format, xs: list[float]) -> None:
    x = np.asarray(xs)
    got = fmt.decode(fmt.encode(x))
    best = np.min(np.abs(fmt.finite_values[None, :] - x[:, None]), axis=1)
    np.testing.assert_allclose(np.abs(got - x), best, rtol=0, atol=1e-12)


@given(st.integers(1, 8), st.integers(1, 100), st.integers(1, 5), st.integers(0, 2**31))
def test_pack_unpack_round_trips(bits: int, k: int, n: int, seed: int) -> None:
    codes = np.random.default_rng(seed).integers(0, 2**bits, (k, n, 2))
    packed = pack(codes, bits)
    assert all(p.dtype == np.uint32 for p in packed.planes)
    np.testing.assert_array_equal(unpack(packed), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_packed_storage_is_honest(bits: int) -> None:
    for k, n in ((4096, 8), (352, 3)):
        packed = pack(np.zeros((k, n), np.uint8), bits)
        ideal = k * n * bits / 8
        assert packed.nbytes <= 1.10 * ideal, (bits, k, packed.nbytes, ideal)
        if k % 32 == 0:
            assert packed.nbytes == ideal


@given(st.sampled_from(all_formats()), st.sampled_from([32, 64, 128, 256, None]),
       st.sampled_from(["f32", "bf16", "f16"]), st.integers(0, 2**31))
def test_quantization_error_within_the_format_bound(fmt: Format, group: int | None, scale_dtype: str,
                                                   seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((256, 6)) * rng.uniform(0.01, 3)).astype(np.float32)
    q = quantize_codes(w, fmt, group, scale_dtype)
    err = np.abs(dequantize_codes(q) - w).reshape(256 // q.group, q.group, 6).max(axis=1)
    bound = error_bound(fmt, q.scales)
    assert np.all(err <= bound * (1 + 1e-6) + 1e-12), (err.max(), bound.max())
    np.testing.assert_array_equal(unpack(pack(q.codes, fmt.bits)), q.codes)


def test_bad_formats_and_inputs_raise_value_errors() -> None:
    with pytest.raises(ValueError, match="bit width must be an int in 1..8"):
        Format("int", 9)
    with pytest.raises(ValueError, match="bit width must be an int in 1..8"):
        Format("uint", 0)
    with pytest.raises(ValueError, match="needs 8 values, got 7"):
        Format("lut", 3, lut=tuple(range(7)))
    with pytest.raises(ValueError, match="fp formats are"):
        Format("fp", 5, "e2m2")
    with pytest.raises(ValueError, match="group size 48 does not divide the reduction axis of size 64"):
        quantize_codes(np.ones((64, 4), np.float32), Format("int", 4), 48)
    with pytest.raises(ValueError, match="expected a 2-D float weight"):
        quantize_codes(np.ones((64, 4), np.int32), Format("int", 4), 32)
