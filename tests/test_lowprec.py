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


def test_pairs_packing_puts_each_2_bit_words_top_bits_beside_its_codes() -> None:
    """The 3-bit "pairs" order: the 2-bit plane as before; 1-bit word s holds the top bits of rows
    32 s + 16 c + j at bit 16 (j // 8) + 4 ((j % 8) // 2) + 2 (1 - c) + j % 2, so that 2-bit word
    2 s + c masked by 0x33333333, ORed with (1-bit word << 2 c) masked by 0x44444444, holds the
    3-bit codes of its even lanes at 4-bit strides (what the paired kernels decode), and the old
    order packs and unpacks as before."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 8, (96, 5))
    paired, plain = pack(codes, 3, "pairs"), pack(codes, 3)
    np.testing.assert_array_equal(paired.planes[0], plain.planes[0])
    assert not np.array_equal(paired.planes[1], plain.planes[1])
    for packed in (paired, plain):
        np.testing.assert_array_equal(unpack(packed), codes)
    for c in (0, 1):
        merged = (paired.planes[0][c::2] & 0x33333333) | ((paired.planes[1] << np.uint32(2 * c)) & 0x44444444)
        for lane in range(0, 16, 2):
            got = (merged >> np.uint32(2 * lane)) & 7
            np.testing.assert_array_equal(got, codes[16 * c + lane::32][:3])
    with pytest.raises(ValueError, match="defined for 3-bit codes"):
        pack(codes, 4, "pairs")
    with pytest.raises(ValueError, match="packing must be one of"):
        pack(codes, 3, "nibbles")


def test_old_and_new_packings_dequantize_alike() -> None:
    """A weight quantized before the pairs order (``packing="planes"``) still decodes, to the same
    values, through the reference decoder and a fused kernel."""
    w = jnp.asarray(np.random.default_rng(2).standard_normal((256, 40)), jnp.float32)
    new = lowprec.quantize({"w": w}, lowprec.QuantSpec(3, 64))["w"]
    old = lowprec.quantize({"w": w}, lowprec.QuantSpec(3, 64, packing="planes"))["w"]
    assert (new.packing, old.packing) == ("pairs", "planes")
    np.testing.assert_array_equal(np.asarray(new.dequantize()), np.asarray(old.dequantize()))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((3, 256)), jnp.float32)
    fused = fusec.jit(lambda x, q: x @ q, backend="pallas", interpret=True)
    np.testing.assert_allclose(np.asarray(fused(x, old)), np.asarray(fused(x, new)), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(np.asarray(fused(x, new)), np.asarray(x @ new.dequantize()), rtol=1e-5, atol=1e-4)


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


# -- quantized parameters in JAX ---------------------------------------------------------------
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import fusec  # noqa: E402
from fusec import lowprec  # noqa: E402


def _mlp(params, x):
    h = jax.nn.gelu(x @ params["l0"]["w"] + params["l0"]["b"])
    return h @ params["l1"]["w"]


def _mlp_params(rng: np.random.Generator) -> dict:
    return {"l0": {"w": jnp.asarray(rng.standard_normal((128, 256)) * 0.1, jnp.float32), "b": jnp.zeros(256)},
            "l1": {"w": jnp.asarray(rng.standard_normal((256, 64)) * 0.1, jnp.float32)}}


@pytest.mark.parametrize("spec", [lowprec.QuantSpec(3, 128), lowprec.QuantSpec(4, 64, "nf"),
                                  lowprec.QuantSpec(6, 32, "fp", scale_dtype="f16"),
                                  lowprec.QuantSpec(5, None, "uint", scale_dtype="f32"),
                                  lowprec.QuantSpec(2, 32, "lut", lut=(-1.0, -0.25, 0.25, 1.0))],
                         ids=lambda s: f"{s.fmt}{s.bits}")
def test_quantized_params_run_unchanged_model_code(spec) -> None:
    rng = np.random.default_rng(0)
    params = _mlp_params(rng)
    x = jnp.asarray(rng.standard_normal((4, 128)), jnp.float32)
    qparams = lowprec.quantize(params, spec)
    assert isinstance(qparams["l0"]["w"], lowprec.QuantizedArray) and not lowprec.is_quantized(qparams["l0"]["b"])
    ref = jax.jit(_mlp)(lowprec.dequantize(qparams), x)
    for backend in ("xla", "pallas"):
        got = fusec.jit(_mlp, backend=backend, interpret=True)(qparams, x)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5, atol=2e-5)
    # The JAX unpacking agrees with the NumPy ground truth.
    w = np.asarray(params["l0"]["w"])
    truth = dequantize_codes(quantize_codes(w, spec.format(), spec.group, spec.scale_dtype))
    np.testing.assert_allclose(np.asarray(qparams["l0"]["w"].dequantize()), truth, rtol=1e-6, atol=1e-6)
    stats = lowprec.report(params, qparams)
    assert stats["['l0']['w']"]["bits_per_weight"] < spec.bits + 0.6


def test_quantize_errors_name_the_parameter_path() -> None:
    params = {"enc": {"w": jnp.ones((96, 8)), "ids": jnp.ones((8, 8), jnp.int32)}}
    with pytest.raises(ValueError, match=r"\['enc'\]\['w'\]: group size 64 does not divide"):
        lowprec.quantize(params, lowprec.QuantSpec(4, 64), where=lambda p, x: p.endswith("['w']"))
    with pytest.raises(ValueError, match=r"\['enc'\]\['ids'\]: only float weights"):
        lowprec.quantize(params, lowprec.QuantSpec(4, 32), where=lambda p, x: True)
    # The default picks float weights that split into whole groups, and leaves the rest alone.
    picked = lowprec.quantize(params, lowprec.QuantSpec(4, 32))
    assert lowprec.is_quantized(picked["enc"]["w"]) and picked["enc"]["ids"] is params["enc"]["ids"]
    assert not lowprec.is_quantized(lowprec.quantize(params, lowprec.QuantSpec(4, 64))["enc"]["w"])
    with pytest.raises(ValueError, match=r"\['enc'\]\['w'\]: bit width must be an int in 1..8, got 9"):
        lowprec.quantize(params, lowprec.QuantSpec(9, 32), where=lambda p, x: p.endswith("['w']"))
    with pytest.raises(ValueError, match=r"\['enc'\]\['w'\]: a 3-bit lookup table needs 8 values, got 4"):
        lowprec.quantize(params, lowprec.QuantSpec(3, 32, "lut", lut=(0.0, 1.0, 2.0, 3.0)),
                         where=lambda p, x: p.endswith("['w']"))


def test_ir_names_the_low_bit_format_and_round_trips() -> None:
    from fusec.ir import parse_module, print_module, verify_module

    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.standard_normal((128, 64)), jnp.float32)}
    x = jnp.ones((2, 128))
    # 3 bits are packed in pairs order by default ("p"); the old order stays available and named.
    for spec, name in ((lowprec.QuantSpec(3, 32), "i3g32p"), (lowprec.QuantSpec(3, 32, packing="planes"), "i3g32"),
                       (lowprec.QuantSpec(4, None, "nf"), "nf4gc"), (lowprec.QuantSpec(3, 64, "uint"), "u3g64zp"),
                       (lowprec.QuantSpec(7, 64, "uint"), "u7g64z"), (lowprec.QuantSpec(6, 32, "fp"), "e2m3g32")):
        lowered = fusec.jit(lambda p, x: x @ p["w"], backend="pallas", interpret=True).lower(
            lowprec.quantize(params, spec), x)
        text = lowered.as_text()
        assert f'format = "{name}"' in text and not lowered.fallbacks
        # The quantized argument is one parameter of the low-bit type, not its packed arrays.
        assert f": {name}[128,64]" in text.splitlines()[0], text.splitlines()[0]
        module = parse_module(text)
        verify_module(module)
        assert print_module(module) == text


# -- the fused dequantize-matmul kernel ---------------------------------------------------------
def _spec(family: str, bits: int, group: int | None) -> lowprec.QuantSpec:
    if family == "fp":
        layout = {4: "e2m1", 6: "e2m3", 8: "e4m3"}[bits]
        return lowprec.QuantSpec(bits, group, "fp", layout=layout, scale_dtype="bf16")
    if family == "lut":
        return lowprec.QuantSpec(bits, group, "lut", lut=tuple(np.linspace(-1, 1, 2**bits) ** 3))
    return lowprec.QuantSpec(bits, group, family, scale_dtype="f32" if family == "uint" else "bf16")


FUSED_FORMATS = ([("int", b) for b in range(1, 9)] + [("uint", b) for b in range(1, 9)]
                 + [("fp", b) for b in (4, 6, 8)] + [("nf", b) for b in range(2, 9)]
                 + [("lut", b) for b in range(1, 9)])


def _check_fused(family: str, bits: int, group: int | None, m: int, k: int, n: int, lower: bool) -> None:
    rng = np.random.default_rng(bits * 1000 + m + k + n)
    params = {"w": jnp.asarray(rng.standard_normal((k, n)) * 0.1, jnp.float32),
              "b": jnp.asarray(rng.standard_normal(n), jnp.float32)}
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    q = lowprec.quantize(params, _spec(family, bits, group), where=lambda p, leaf: p.endswith("['w']"))
    model = lambda p, x: jnp.tanh(x @ p["w"] + p["b"])  # noqa: E731
    fused = fusec.jit(model, backend="pallas", interpret=True)
    entry = fused.lower(q, x).program.module.entry
    # One kernel; a skinny one (M <= 16) leaves its epilogue to a second (split-epilogue, for split-K).
    kinds = [op.attr("kind") for op in entry.ops if op.opcode != "reshape"]
    assert kinds == (["matmul", "elementwise"] if m <= 16 else ["matmul"]), "dequantize was not fused"
    want = jax.jit(model)(lowprec.dequantize(q), x)
    np.testing.assert_allclose(np.asarray(fused(q, x)), np.asarray(want), rtol=2e-5, atol=2e-5)
    if lower:
        gpu = fusec.jit(model, backend="pallas", interpret=False)
        resources = gpu.lower(q, x).gpu_resources(90)
        assert len(resources) == len(kinds) and all(r.spills == 0 for r in resources), resources


@given(st.sampled_from(FUSED_FORMATS), st.sampled_from([32, 64, 128, 256, None]), st.sampled_from([1, 3, 16, 64]),
       st.integers(1, 4), st.integers(1, 70))
def test_fused_dequantize_matmul_matches_xla(fmt, group, m, k_groups, n) -> None:
    family, bits = fmt
    k = (group or 37) * k_groups
    _check_fused(family, bits, group, m, k, n, lower=False)


@pytest.mark.parametrize("m", [1, 64])
@pytest.mark.parametrize("family,bits", FUSED_FORMATS, ids=[f"{f}{b}" for f, b in FUSED_FORMATS])
def test_fused_dequantize_matmul_compiles_without_spills(family: str, bits: int, m: int) -> None:
    _check_fused(family, bits, 128, m, 256, 100, lower=True)


@pytest.mark.slow
@pytest.mark.parametrize("family,bits", FUSED_FORMATS, ids=[f"{f}{b}" for f, b in FUSED_FORMATS])
@pytest.mark.parametrize("group", [32, 64, 128, 256, None])
@pytest.mark.parametrize("m", [1, 3, 16, 64])
def test_fused_dequantize_matmul_full_matrix(family: str, bits: int, group: int | None, m: int) -> None:
    for k, n in ((256, 96), (512, 100)):
        _check_fused(family, bits, group, m, k if group else k - 27, n, lower=False)


# Documented bounds on the relative error of a model's output (its change, for a residual block)
# with every 2-D weight quantized to int, group 64, bfloat16 scales. Measured: 3 bits 0.37,
# 4 bits 0.15, 6 bits 0.035 (MLP and GPT-2 block alike).
RELATIVE_ERROR_BOUND = {3: 0.5, 4: 0.25, 6: 0.06}


@pytest.mark.parametrize("bits", sorted(RELATIVE_ERROR_BOUND))
def test_quantized_models_stay_within_the_documented_error(bits: int) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from quickstart import gpt2_block, init_params

    key = jax.random.key(0)
    x = jax.random.normal(jax.random.fold_in(key, 3), (16, 128))

    def mlp(p, x):
        return jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"]

    mlp_params = {"w1": jax.random.normal(key, (128, 512)) * 0.05, "b1": jnp.zeros(512),
                  "w2": jax.random.normal(jax.random.fold_in(key, 1), (512, 128)) * 0.05}
    block = lambda p, x: gpt2_block(x, p)  # noqa: E731
    for fn, params, residual in ((mlp, mlp_params, False), (block, init_params(key, 128), True)):
        q = lowprec.quantize(params, lowprec.QuantSpec(bits, 64))
        fused = fusec.jit(fn, backend="pallas", interpret=True)
        entry = fused.lower(q, x).program.module.entry
        assert not any(op.opcode == "dequantize" for op in entry.ops), "every dequantize is fused into its matmul"
        out, ref = np.asarray(fused(q, x)), np.asarray(jax.jit(fn)(params, x))
        change = ref - np.asarray(x) if residual else ref
        rel = np.linalg.norm(out - ref) / np.linalg.norm(change)
        print(f"{bits}-bit: relative error {rel:.4f}")
        assert rel < RELATIVE_ERROR_BOUND[bits]


def test_skinny_and_wide_tile_strategies() -> None:
    q = lowprec.quantize({"w": jnp.ones((1024, 512))}, lowprec.QuantSpec(3, 128))
    # One row of float32 weights multiplies on the FMA units: no padding to 16 rows.
    for m, strategy, block in ((1, "gemv-fma", (1, 128)), (16, "gemv", (16, 128)), (64, "gemm", (64, 64))):
        lowered = fusec.jit(lambda p, x: x @ p["w"], backend="pallas", interpret=False).lower(q, jnp.ones((m, 1024)))
        (kernel,) = [op for op in lowered.program.module.entry.ops if op.opcode == "kernel" and
                     op.attr("kind") == "matmul"]
        assert (kernel.attr("strategy"), tuple(kernel.attr("block"))) == (strategy, block)
        # The kernel reads 3 bits per weight plus bfloat16 group scales, not the float weight.
        weight_bytes = 1024 * 512 * 3 // 8 + (1024 // 128) * 512 * 2
        assert weight_bytes <= kernel.attr("bytes_read") <= weight_bytes + m * 1024 * 4


@pytest.mark.parametrize("quantized", [("wg", "wu"), ("wg",)])
def test_quantized_sibling_matmuls_share_one_kernel(quantized: tuple[str, ...]) -> None:
    rng = np.random.default_rng(5)
    p = {name: jnp.asarray(rng.standard_normal(shape) * 0.1, jnp.float32)
         for name, shape in (("wg", (128, 96)), ("wu", (128, 96)), ("wd", (96, 128)))}
    swiglu = lambda p, x: (jax.nn.silu(x @ p["wg"]) * (x @ p["wu"])) @ p["wd"]  # noqa: E731
    x = jnp.asarray(rng.standard_normal((5, 128)), jnp.float32)
    q = lowprec.quantize(p, lowprec.QuantSpec(4, 32), where=lambda path, leaf: any(n in path for n in quantized))
    fused = fusec.jit(swiglu, backend="pallas", interpret=True)
    entry = fused.lower(q, x).program.module.entry
    assert [op.attr("kind") for op in entry.ops if op.opcode == "kernel"] == ["matmul", "matmul"]
    np.testing.assert_allclose(np.asarray(fused(q, x)), np.asarray(swiglu(lowprec.dequantize(q), x)),
                               rtol=2e-5, atol=2e-5)
