"""Low-bit weights are grouped along the axes their matmuls contract, wherever those are, and every
such matmul runs in a fused low-bit kernel; quantize says what it left float and why."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusec
from fusec import lowprec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from fusec.ir import LowBitType

SPEC = lowprec.QuantSpec(4, 128)


def _random(shape, seed: int):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _fused_low_bit(fn, *args) -> tuple[int, list[str]]:
    """How many kernels read a packed weight, and the XLA ops left (reshapes, constants aside)."""
    ops = fusec.jit(fn, backend="pallas").lower(*args).program.module.entry.ops
    low_bit = sum(op.opcode == "kernel" and any(isinstance(v.type.elem, LowBitType) for v in op.operands)
                  for op in ops)
    return low_bit, [op.opcode for op in ops if op.opcode not in ("kernel", "reshape", "constant")]


def _check(fn, params, *args, argnum: int = 0, kernels: int = 1) -> None:
    call_args = list(args)
    call_args.insert(argnum, params)
    axes = lowprec.contraction_axes(fn, *call_args, argnum=argnum)
    q = lowprec.quantize(params, SPEC, axes=axes)
    assert all(e.quantized for e in lowprec.plan(params, SPEC, axes=axes) if np.ndim(params[e.path[2:-2]]) >= 2)
    q_args = list(args)
    q_args.insert(argnum, q)
    low_bit, xla = _fused_low_bit(fn, *q_args)
    assert low_bit == kernels and "dequantize" not in xla, (low_bit, xla)
    f_args = list(args)
    f_args.insert(argnum, lowprec.dequantize(q))
    np.testing.assert_allclose(fusec.jit(fn, backend="pallas")(*q_args), jax.jit(fn)(*f_args), rtol=2e-4, atol=2e-3)


def test_x_at_w_transposed() -> None:
    _check(lambda p, x: jnp.tanh(x @ p["w"].T), {"w": _random((48, 256), 0)}, _random((3, 256), 1))


def test_w_at_x_under_vmap() -> None:
    fn = jax.vmap(lambda p, x: p["w"] @ x + 1.0, in_axes=(None, 0))
    _check(fn, {"w": _random((40, 128), 2)}, _random((5, 128), 3))


def test_dense_general_attention_projections() -> None:
    def attention_proj(p, x):
        h = jnp.einsum("bsd,dhk->bshk", x, p["wq"])
        return jnp.einsum("bshk,hkd->bsd", h, p["wo"])

    params = {"wq": _random((128, 4, 32), 4), "wo": _random((4, 32, 128), 5)}
    assert lowprec.contraction_axes(attention_proj, params, _random((2, 5, 128), 6)) == \
        {"['wq']": (0,), "['wo']": (0, 1)}
    _check(attention_proj, params, _random((2, 5, 128), 6), kernels=2)


def test_tied_embedding_logits() -> None:
    def lm(p, ids):
        return jnp.tanh(p["E"][ids]) @ p["E"].T  # the gather reads the float table; the logits fuse

    params = {"E": _random((200, 128), 7)}
    q = lowprec.quantize(params, SPEC, axes=lowprec.contraction_axes(lm, params, jnp.arange(5)))
    low_bit, _ = _fused_low_bit(lm, q, jnp.arange(5))
    assert low_bit == 1
    np.testing.assert_allclose(fusec.jit(lm, backend="pallas")(q, jnp.arange(5)),
                               jax.jit(lm)(lowprec.dequantize(q), jnp.arange(5)), rtol=2e-4, atol=2e-3)


def test_equinox_linear_under_vmap() -> None:
    eqx = pytest.importorskip("equinox")
    layer = eqx.nn.Linear(128, 24, key=jax.random.key(0))
    params = {"w": layer.weight, "b": layer.bias}
    fn = jax.vmap(lambda p, x: p["w"] @ x + p["b"], in_axes=(None, 0))
    _check(fn, params, _random((4, 128), 8))


def test_plan_says_what_is_left_and_why() -> None:
    params = {"w": _random((256, 8), 0), "odd": _random((100, 8), 1), "b": jnp.ones(8),
              "i": jnp.ones((4, 4), jnp.int32)}
    entries = {e.path: e for e in lowprec.plan(params, SPEC)}
    assert entries["['w']"].quantized and entries["['w']"].reason == ""
    assert "not a whole number of 128-row groups" in entries["['odd']"].reason
    assert "1-D" in entries["['b']"].reason and "int32, not a float weight" in entries["['i']"].reason
    summary = lowprec.plan_summary(list(entries.values()))
    assert summary.startswith("quantized 1 of 4 leaves") and "['odd']: left:" in summary


def test_a_leaf_named_by_where_that_cannot_be_quantized_raises_naming_it() -> None:
    params = {"odd": _random((100, 8), 1)}
    with pytest.raises(ValueError, match=r"\['odd'\]: group size 128 does not divide"):
        lowprec.quantize(params, SPEC, where=lambda path, leaf: True)
    with pytest.raises(ValueError, match=r"\['odd'\]: a weight of shape \[100, 8\] contracted over axes \[2\]"):
        lowprec.quantize(params, SPEC, where=lambda path, leaf: True, axes={"['odd']": 2})


@pytest.mark.parametrize("module", ["equinox_block", "linen_block"])
def test_example_models_put_their_matrices_in_low_bit_kernels(module: str) -> None:
    """Every matrix a matmul contracts is quantized and read by a fused low-bit kernel; the
    matrices left float are named with a reason (bench/lowbit_coverage.py prints the table)."""
    pytest.importorskip({"equinox_block": "equinox", "linen_block": "flax"}[module])
    from bench.lowbit_coverage import coverage

    ex = __import__(module)
    params, x = ex.example_inputs()
    c = coverage(ex.forward, params, x, 0)
    assert c["low_bit_kernel_share"] == pytest.approx(c["quantized_share"]) and c["quantized_share"] > 0.95
    assert all(reason for _, reason in c["matrices_left"])
