"""The paired low-bit GEMV (``strategy = "gemv-pairs"``): two codes decoded per 32-bit operation,
the matmul on biased codes, the bias and the group scale applied once per output element. Which
kernels get it, exactness at shapes that divide no block (the GPU tiling run in interpret mode),
and the sm_80/sm_90 compile (0 spills, the static report's instructions per weight)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusec
from fusec import lowprec
from fusec.ir import LowBitType, parse_elem_type
from fusec.ir.tile_ops import pair_bias, pair_format_ok
from tests.test_splitk import GPU_TILES_INTERPRETED

SMOKE = ("test_which_formats_decode_in_pairs", "test_paired_gemv_matches_a_float64_reference")


def _strategy(q, x) -> str | None:
    fused = fusec.jit(lambda q, x: x @ q, backend="pallas", interpret=True, passes=GPU_TILES_INTERPRETED)
    (op,) = [o for o in fused.lower(q, x).program.module.entry.ops
             if o.opcode == "kernel" and o.attr("kind") == "matmul"]
    return op.attr("strategy")


def _weight(bits: int, group: int, k: int, n: int, family: str = "int", dtype=jnp.bfloat16, seed: int = 0,
            packing: str | None = None):
    w = jnp.asarray(np.random.default_rng(seed).standard_normal((k, n)) * 0.1, dtype)
    return lowprec.quantize({"w": w}, lowprec.QuantSpec(bits, group, family, packing=packing))["w"]


def test_which_formats_decode_in_pairs() -> None:
    fmt = parse_elem_type("i4g128")
    assert isinstance(fmt, LowBitType) and pair_format_ok(fmt, "bf16") and pair_bias(fmt, "bf16") == 136
    assert pair_format_ok(parse_elem_type("i2g64"), "bf16") and pair_format_ok(parse_elem_type("i8g128"), "f16")
    assert pair_format_ok(parse_elem_type("i3g128p"), "bf16")  # 3 bits packed in pairs order
    # 8-bit codes overflow bfloat16's 7 mantissa bits; 3 bits in plain plane order; zero-points, 3-bit
    # and wide tables.
    for text, dtype in (("i8g128", "bf16"), ("i3g128", "bf16"), ("i4g128", "f32"), ("u4g128z", "bf16"),
                        ("u3g128zp", "bf16"), ("nf3g128p", "bf16"), ("nf3g128", "bf16"), ("lut8g128", "bf16")):
        assert not pair_format_ok(parse_elem_type(text), dtype), text
    x = jnp.ones((3, 512), jnp.bfloat16)
    assert _strategy(_weight(4, 128, 512, 200), x) == "gemv-pairs"
    assert _strategy(_weight(2, 128, 512, 200), x) == "gemv-pairs"
    assert _strategy(_weight(3, 128, 512, 200), x) == "gemv-pairs"  # quantize packs 3 bits in pairs order
    assert _strategy(_weight(3, 128, 512, 200, packing="planes"), x) == "gemv"  # the old order: general decoder
    assert _strategy(_weight(4, 128, 512, 200, "nf"), x) == "gemv-pairs"  # by table permutes (test_lut_decode)
    assert _strategy(_weight(3, 128, 512, 200, "nf"), x) == "gemv"
    assert _strategy(_weight(4, 32, 512, 200), x) == "gemv"  # 32-row steps: 8-row dots, too small
    # float32 activations: the dot would need float32 weights.
    assert _strategy(_weight(4, 128, 512, 200, dtype=jnp.float32), x.astype(jnp.float32)) != "gemv-pairs"


def test_int3_unpack_pair_type_rule() -> None:
    """A 3-bit unpack_pair takes the 2-bit words and the 1-bit plane's half as many, in parity order,
    one or two lanes at a time; anything else is a type error naming what is wrong."""
    from fusec.ir import TensorType, dtype
    from fusec.ir.opdefs import OPDEFS, TypeRuleError

    rule = OPDEFS["unpack_pair"].rule
    u32 = lambda r: TensorType(dtype("u32"), (r, 64))  # noqa: E731
    ok = {"format": "i3g128p", "dtype": "bf16", "lane": 6, "parity": True, "count": 2}
    assert rule([u32(8), u32(4)], ok) == [TensorType(dtype("bf16"), (32, 64))]
    for attrs, types, message in ((ok | {"parity": False}, [u32(8), u32(4)], "parity=True"),
                                  (ok | {"lane": 7}, [u32(8), u32(4)], "lanes below 8"),
                                  (ok | {"count": 3}, [u32(8), u32(4)], "count=3 must be 1 or 2"),
                                  (ok, [u32(8), u32(8)], r"the 1-bit plane of u32\[8,64\] is u32\[4,64\]"),
                                  (ok, [u32(8)], "from 2 plane tile"),
                                  (ok | {"format": "i3g128"}, [u32(8), u32(4)], "does not decode in pairs")):
        with pytest.raises(TypeRuleError, match=message):
            rule(types, attrs)
    # A table pairs adjacent codes one lane at a time (no count = 2, no parity order).
    table = {"format": "nf4g64", "dtype": "bf16", "lane": 2}
    assert rule([u32(8)], table) == [TensorType(dtype("bf16"), (16, 64))]
    with pytest.raises(TypeRuleError, match="count=2: a table format"):
        rule([u32(8)], table | {"count": 2})
    picks = {"lanes": 8, "lane": 0, "adjacent": True}
    assert OPDEFS["pick_lanes"].rule([TensorType(dtype("bf16"), (1, 64))], picks)[0].shape == (1, 16)
    for bad in ({"count": 2}, {"parity": True}):
        with pytest.raises(TypeRuleError, match="adjacent pairing"):
            OPDEFS["pick_lanes"].rule([TensorType(dtype("bf16"), (1, 64))], picks | bad)


@pytest.mark.parametrize("bits,group", [(4, 128), (4, 64), (2, 128), (3, 128)])
@pytest.mark.parametrize("m", [1, 3, 5, 16])
def test_paired_gemv_matches_a_float64_reference(bits: int, group: int, m: int) -> None:
    """N = 200 and K = 640 divide no block. The kernel multiplies by the decoded values code x scale
    themselves (the reference decoder's values before it rounds them to the weight's bfloat16) and
    rounds once, the output to bfloat16: each element is within one bfloat16 ulp (plus float32
    accumulation error) of the exact product."""
    k, n = 640, 200
    q = _weight(bits, group, k, n, seed=bits * m)
    x = jnp.asarray(np.random.default_rng(m).standard_normal((m, k)), jnp.bfloat16)
    assert _strategy(q, x) == "gemv-pairs"
    fused = fusec.jit(lambda q, x: x @ q, backend="pallas", interpret=True, passes=GPU_TILES_INTERPRETED)
    got = np.asarray(fused(q, x).astype(jnp.float32), np.float64)
    decoded = dataclasses.replace(q, dtype=jnp.dtype("float32")).dequantize()  # code x scale, exact in f32
    exact = np.asarray(x, np.float64) @ np.asarray(decoded, np.float64)
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(exact), 1e-30))) - 7)
    assert np.all(np.abs(got - exact) <= ulp + 1e-4), np.max(np.abs(got - exact) / ulp)
    # And against what a user compares with: jax.jit of the same product.
    want = np.asarray(jax.jit(lambda q, x: x @ lowprec.dequantize(q))(q, x).astype(jnp.float32))
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)


def test_paired_gemv_compiles_for_sm80_and_sm90_without_spills() -> None:
    q = _weight(4, 128, 1024, 1000)
    x = jax.ShapeDtypeStruct((1, 1024), jnp.bfloat16)
    lowered = fusec.jit(lambda q, x: x @ q, backend="pallas", interpret=False).lower(q, x)
    for arch in (80, 90):
        resources = lowered.gpu_resources(arch)
        assert resources and all(r.spills == 0 for r in resources), resources
    (kernel,) = [k for k in lowered.gpu_profile(90, "h100").kernels if k.per == "weight"]
    # The general decoder's loop spends 5.6 thread-instructions per weight here (BENCHMARKS.md);
    # the paired one under 4.
    assert kernel.instructions_per_element < 4.0, kernel.instructions_per_element


def test_int3_pairs_mask_overhanging_accesses_and_stay_under_4_5_instructions_per_weight() -> None:
    """The 3-bit paired GEMV lowered for cuda (N = 200 overhangs its 64-column blocks): every
    overhanging load and store masked, 0 spills, and at most 4.5 thread-instructions per weight in
    the hot loop (the general decoder it replaces: about 8.4 at 4096 x 14336, BENCHMARKS.md)."""
    from tests.test_bounds import check_masks

    q = _weight(3, 128, 640, 200)
    x = jnp.zeros((3, 640), jnp.bfloat16)
    gpu = fusec.jit(lambda x, q: x @ q, backend="pallas", interpret=False)
    assert check_masks(gpu, x, q) >= 1
    lowered = fusec.jit(lambda q, x: x @ q, backend="pallas", interpret=False).lower(
        _weight(3, 128, 1024, 1000), jax.ShapeDtypeStruct((1, 1024), jnp.bfloat16))
    assert lowered.program.module.entry.ops[0].attr("strategy") == "gemv-pairs"
    (kernel,) = [k for k in lowered.gpu_profile(90, "h100").kernels if k.per == "weight"]
    assert kernel.spills == 0 and kernel.instructions_per_element <= 4.5, kernel.instructions_per_element
