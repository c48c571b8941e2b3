"""Split-K low-bit GEMV (M <= 16): the K loop split across programs of one more grid axis, partial
sums added atomically into a zero-initialised f32 output, the epilogue in a second kernel -- or,
when the epilogue is only a cast, finished in the same kernel by the program that adds the last
partial sum. The GPU tiling runs here in interpret mode, exact against the reference decoder."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusec
from fusec import lowprec
from fusec.ir import verify_module
from fusec.pipeline import DEFAULT_PIPELINE, KERNEL_PASSES

# The GPU tiles (split-K included), run by Pallas's interpreter.
GPU_TILES_INTERPRETED = ",".join([*DEFAULT_PIPELINE, *KERNEL_PASSES, "tile{target=gpu}", "fold-views", "dce",
                                  "to-tile"])
FORMATS = {"int4": (4, "int"), "int3": (3, "int"), "int2": (2, "int"), "int8": (8, "int"), "nf4": (4, "nf")}


def _model(p, x):
    return jnp.tanh(x @ p["w"] + p["b"])


def _check(spec: lowprec.QuantSpec, m: int, k: int, n: int, model=_model) -> fusec.Lowered:
    rng = np.random.default_rng(m * 7 + k + n)
    params = {"w": jnp.asarray(rng.standard_normal((k, n)) * 0.1, jnp.float32),
              "b": jnp.asarray(rng.standard_normal(n), jnp.float32)}
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    q = lowprec.quantize(params, spec, where=lambda path, leaf: path.endswith("['w']"))
    fused = fusec.jit(model, backend="pallas", interpret=True, passes=GPU_TILES_INTERPRETED)
    lowered = fused.lower(q, x)
    verify_module(lowered.program.module)
    want = jax.jit(model)(lowprec.dequantize(q), x)
    np.testing.assert_allclose(np.asarray(fused(q, x)), np.asarray(want), rtol=2e-5, atol=2e-5)
    return lowered


def _matmul_kernel(lowered: fusec.Lowered):
    (op,) = [o for o in lowered.program.module.entry.ops if o.opcode == "kernel" and o.attr("kind") == "matmul"]
    return op


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("m", [1, 3, 5, 16, 17])
def test_split_k_gemv_is_exact_in_interpret_mode(name: str, group: int, m: int) -> None:
    bits, family = FORMATS[name]
    spec = lowprec.QuantSpec(bits, group, family)
    k = 320 if group == 32 else 512  # N = 200 divides no N block; K = 320 no 64-row step
    op = _matmul_kernel(_check(spec, m, k, 200))
    if m <= 16:
        # The K loop splits: a third grid axis, and the partial sums are added atomically.
        # One row of an f32 model multiplies on the FMA units (a broadcast product summed over K).
        assert op.attr("split", 1) > 1 and op.attr("strategy") == ("gemv-fma" if m == 1 else "gemv")
        assert str(op.results[0].type.elem) == "f32"
    else:
        assert op.attr("split", 1) == 1


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("m", [1, 5, 16])
def test_bfloat16_decode_is_bit_exact(name: str, m: int) -> None:
    """bfloat16 weights decode in bfloat16 (the 0x4300 bit pattern, packed bf16 arithmetic): one-hot
    rows of x pick rows of the weight, which must equal the reference decoder's bit for bit."""
    bits, family = FORMATS[name]
    k, n = 256, 200
    w = jnp.asarray(np.random.default_rng(bits).standard_normal((k, n)) * 0.1, jnp.bfloat16)
    q = lowprec.quantize({"w": w}, lowprec.QuantSpec(bits, 128, family))["w"]
    rows = np.arange(m) * 37 % k
    x = jnp.asarray(np.eye(k)[rows], jnp.bfloat16)
    fused = fusec.jit(lambda q, x: x @ q, backend="pallas", interpret=True, passes=GPU_TILES_INTERPRETED)
    got = np.asarray(fused(q, x).astype(jnp.float32))
    want = np.asarray(lowprec.dequantize(q).astype(jnp.float32))[rows]
    if family == "nf":
        # Paired table decodes round the table to bfloat16 before the scale, not value x scale
        # after it: one rounding more, checked bit for bit in tests/test_lut_decode.py.
        np.testing.assert_allclose(got, want, rtol=2**-7, atol=0)
        return
    np.testing.assert_array_equal(got, want)


_FIXUP_CASES = [(b, m) for b in ("pallas", "triton") for m in (1, 3, 5, 16)]
_FIXUP_SAMPLED = [("pallas", 1), ("pallas", 16), ("triton", 3)]


@pytest.mark.parametrize("backend,m", [c if c in _FIXUP_SAMPLED else pytest.param(*c, marks=pytest.mark.slow)
                                       for c in _FIXUP_CASES])
def test_split_k_with_a_cast_finishes_in_one_kernel(backend: str, m: int, monkeypatch) -> None:
    """A bfloat16 GEMV (its epilogue only the cast): the K loop splits, and the program that adds
    the last partial sum (arrival count = split - 1) reloads the whole f32 sum, casts and stores it;
    no second kernel. Equal to the f32 sum rounded once (up to the sum's order). The Triton
    interpreter checks every access (the workspace's and counters' too) against its array."""
    from fusec.codegen.triton import interpret as triton_interpret

    monkeypatch.setattr(triton_interpret, "CHECK_BOUNDS", True)
    k, n = 512, 200  # N = 200 divides no N block; M = 3, 5 no row block
    rng = np.random.default_rng(m)
    w = jnp.asarray(rng.standard_normal((k, n)) * 0.1, jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    q = lowprec.quantize({"w": w}, lowprec.QuantSpec(4, 128))["w"]
    fused = fusec.jit(lambda q, x: x @ q, backend=backend, interpret=True, passes=GPU_TILES_INTERPRETED)
    lowered = fused.lower(q, x)
    module = lowered.program.module
    verify_module(module)
    (op,) = [o for o in module.entry.ops if o.opcode == "kernel"]
    assert op.attr("split", 1) > 1 and str(op.results[0].type.elem) == "bf16"
    tile = module.function(str(op.attr("tile")))
    ops = {o.opcode: o for o in tile.ops}
    (last,) = [o for o in tile.ops if o.opcode == "eq" and o.operands[0] is ops["arrive"].result]
    assert int(next(c for c in tile.ops if c.results and c.result is last.operands[1]).attr("value")) == \
        op.attr("split") - 1
    assert "barrier" in ops and ops["store"].operands[-1] is last.result and ops["store"].attr("when")
    assert [str(p.type) for p in tile.params[-2:]] == [f"f32[{m},{n}]", f"i32[{math.prod(op.attr('grid'))}]"]
    got = np.asarray(fused(q, x).astype(jnp.float32), np.float64)
    assert got.shape == (m, n)
    # Within one bfloat16 ulp (plus f32 accumulation error) of the exact product with the decoded
    # values code x scale (as tests/test_gemv_pairs.py checks the unsplit kernel).
    decoded = dataclasses.replace(q, dtype=jnp.dtype("float32")).dequantize()
    exact = np.asarray(x, np.float64) @ np.asarray(decoded, np.float64)
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(exact), 1e-30))) - 7)
    assert np.all(np.abs(got - exact) <= ulp + 1e-4), np.max(np.abs(got - exact) / ulp)
