"""Input transforms on quantized matrices (W = T . deq(Q), T = diag(in_scale) . block-Hadamard):
exactness of the reference, the fused program computing (x T) @ deq(Q), the pytree, and
``calibrate(rotate=..., awq=...)`` with its errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusec
from fusec import lowprec
from fusec.ir import parse_module, print_module, verify_module
from fusec.lowprec.qarray import from_codes
from fusec.lowprec.quantize import dequantize_codes, quantize_codes
from fusec.lowprec.rotate import InputTransform, hadamard, random_signs


def _transformed(k: int, n: int, contract: tuple[int, ...], t: InputTransform, bits: int = 4, seed: int = 0):
    """A float matrix w (user layout), its QuantizedArray of T^-1 w, and deq(Q) [K, N]."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n))
    q = quantize_codes(t.inverse(w).astype(np.float32), lowprec.QuantSpec(bits, 32).format(), 32, "bf16")
    shape = (k, n) if contract == (0,) else (n, k)
    qa = from_codes(q, shape, np.float32, contract, t, "['w']")
    return (w if contract == (0,) else w.T), qa, dequantize_codes(q)


@pytest.mark.parametrize("block", [1, 2, 16, 128])
def test_hadamard_is_orthonormal_and_symmetric(block: int) -> None:
    h = hadamard(block)
    np.testing.assert_allclose(h @ h.T, np.eye(block), atol=1e-12)
    np.testing.assert_array_equal(h, h.T)
    assert np.all(np.abs(np.abs(h) * np.sqrt(block) - 1) < 1e-12)  # +-1/sqrt(b): no weight favoured
    with pytest.raises(ValueError, match="power of two, got 12"):
        hadamard(12)


@pytest.mark.parametrize("contract", [(0,), (1,)])
@pytest.mark.parametrize("block,scaled", [(32, True), (64, False), (0, True)])
def test_reference_is_exactly_t_times_the_decoded_codes(contract, block: int, scaled: bool) -> None:
    k, n = 128, 48
    rng = np.random.default_rng(block)
    scale = (random_signs(k, 1) * rng.uniform(0.5, 2.0, k)).astype(np.float32) if scaled else None
    t = InputTransform(block, scale)
    w, qa, d = _transformed(k, n, contract, t, bits=8)
    got = np.asarray(lowprec.dequantize({"w": qa})["w"], np.float64)
    want = t.apply(d) if contract == (0,) else t.apply(d).T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # ... which is the float weight up to 8-bit rounding of T^-1 W (T undone, not approximated)
    assert np.sqrt(np.mean((got - w) ** 2)) < 0.02 * np.sqrt(np.mean(w**2))
    np.testing.assert_allclose(t.matrix(k) @ t.inverse(np.eye(k)), np.eye(k), atol=1e-9)
    np.testing.assert_allclose(t.hessian(np.eye(k)), t.matrix(k).T @ t.matrix(k), atol=1e-9)


def test_pytree_round_trip_keeps_the_transform() -> None:
    t = InputTransform(64, random_signs(128, 2))
    _, qa, _ = _transformed(128, 32, (0,), t)
    leaves, treedef = jax.tree.flatten({"w": qa})
    assert len(leaves) == len(qa.planes) + 2  # planes, scales and in_scale
    back = jax.tree.unflatten(treedef, leaves)["w"]
    assert back.rotate_block == 64 and back.transformed
    np.testing.assert_array_equal(np.asarray(back.in_scale), np.asarray(qa.in_scale))
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(qa.dequantize()))
    assert "transform=hadamard64+in_scale" in repr(qa)
    assert lowprec.report({"w": jnp.asarray(np.asarray(qa.dequantize()))}, {"w": qa})["['w']"]["rotate_block"] == 64
    doubled = jax.tree.map(lambda x: x, {"w": qa})["w"]  # tree_map keeps the static part
    assert doubled.rotate_block == 64 and doubled.in_scale is not None


def test_bad_transforms_name_the_matrix() -> None:
    rng = np.random.default_rng(0)
    q = quantize_codes(rng.standard_normal((96, 8)).astype(np.float32), lowprec.QuantSpec(4, 32).format(), 32)
    with pytest.raises(ValueError, match=r"\['w'\]: rotate_block 64 does not divide its contracted size 96"):
        from_codes(q, (96, 8), np.float32, (0,), InputTransform(64), "['w']")
    with pytest.raises(ValueError, match=r"\['w'\]: in_scale has shape \[5\], expected \[96\]"):
        from_codes(q, (96, 8), np.float32, (0,), InputTransform(0, np.ones(5)), "['w']")


@pytest.mark.parametrize("contract", [(0,), (1,)])
def test_fused_program_transforms_x_and_matches_the_reference(contract) -> None:
    t = InputTransform(64, (random_signs(128, 5) * np.linspace(0.5, 2.0, 128)).astype(np.float32))
    _, qa, _ = _transformed(128, 64, contract, t)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 128)), jnp.float32)
    model = (lambda p, x: jnp.tanh(x @ p["w"])) if contract == (0,) else (lambda p, x: jnp.tanh(x @ p["w"].T))
    want = jax.jit(model)(lowprec.dequantize({"w": qa}), x)
    fused = fusec.jit(model, backend="pallas", interpret=True)
    lowered = fused.lower({"w": qa}, x)
    entry = lowered.program.module.entry
    ops = [op.opcode for op in entry.ops]
    # x T on the activations, then the unchanged low-bit kernel reading deq(Q): no weight-side work
    moved = [op for op in entry.ops if op.opcode == "input_transform"]
    assert len(moved) == 1 and moved[0].attr("side") == "input" and "dequantize" not in ops, ops
    kernel = next(op for op in entry.ops if op.opcode == "kernel" and op.attr("kind") == "matmul")
    assert any(op.opcode == "dequantize" for op in lowered.program.module.function(str(kernel.attr("callee"))).ops)
    assert "input_transform" in lowered.as_text() and "input_transform" in str(fused.inspect({"w": qa}, x))
    module = parse_module(lowered.as_text())  # the new op prints, parses and verifies
    verify_module(module)
    assert print_module(module) == lowered.as_text()
    np.testing.assert_allclose(np.asarray(fused({"w": qa}, x)), np.asarray(want), rtol=2e-5, atol=2e-5)
    got = fusec.jit(model, backend="xla")({"w": qa}, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_weight_read_other_ways_stays_exact() -> None:
    t = InputTransform(32, random_signs(64, 7))
    _, qa, _ = _transformed(64, 16, (0,), t)
    x = jnp.ones((4, 64))
    model = lambda p, x: (x @ p["w"]).sum() + p["w"][:, 0].sum()  # noqa: E731 - a non-matmul use of W
    want = jax.jit(model)(lowprec.dequantize({"w": qa}), x)
    got = fusec.jit(model, backend="xla")({"w": qa}, x)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    grad = jax.grad(lambda x: fusec.jit(lambda p, x: jnp.tanh(x @ p["w"]).sum())({"w": qa}, x))(x)
    want_grad = jax.grad(lambda x: jnp.tanh(x @ lowprec.dequantize(qa)).sum())(x)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-5, atol=1e-6)


# -- calibrate(rotate=..., awq=...) -------------------------------------------------------------
def _mlp(params, x):
    return jax.nn.relu(x @ params["l0"]["w"]) @ params["l1"]["w"].T


def _setup(seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {"l0": {"w": jnp.asarray(rng.standard_normal((64, 128)) * 0.2, jnp.float32)},
              "l1": {"w": jnp.asarray(rng.standard_normal((32, 128)) * 0.2, jnp.float32)}}
    # Inputs with a few loud channels, as transformer activations have: what rotation and AWQ target.
    loud = np.where(np.arange(64) % 16 == 0, 8.0, 1.0)
    batches = [(jnp.asarray(rng.standard_normal((64, 64)) * loud, jnp.float32),) for _ in range(3)]
    return params, batches


def _error(params, q, batches) -> float:
    got = np.concatenate([np.asarray(_mlp(lowprec.dequantize(q), *b)) for b in batches])
    ref = np.concatenate([np.asarray(_mlp(params, *b)) for b in batches])
    return float(np.mean((got - ref) ** 2))


def test_calibrate_with_rotation_and_awq_is_exact_and_fused() -> None:
    params, batches = _setup()
    plain = lowprec.calibrate(_mlp, params, batches, bits=3, group=32, method="rtn", search=False)
    q, rep = lowprec.calibrate(_mlp, params, batches, bits=3, group=32, method="rtn", search=False,
                               rotate="hadamard", rotate_block=32, awq=True, with_report=True)
    leaves = jax.tree.leaves(q, is_leaf=lowprec.is_quantized)
    assert all(lowprec.is_quantized(x) and x.rotate_block == 32 for x in leaves)
    assert all("+rot32+awq" in m.method for m in rep.matrices)
    # in_scale, where AWQ chose one (alpha > 0), is counted: 16 bits per input channel (bf16)
    for m in rep.matrices:
        x = q["l0"]["w"] if m.path.startswith("['l0']") else q["l1"]["w"]
        in_scale = 0 if x.in_scale is None else 16 / x.shape[1 - x.contract[0]]
        assert (x.in_scale is None) == m.method.endswith("+awq0")
        assert m.bits_per_weight == pytest.approx(3 + 16 / 32 + in_scale)
    assert _error(params, q, batches) < _error(params, plain, batches)
    x = batches[0][0][:8]
    want = jax.jit(_mlp)(lowprec.dequantize(q), x)
    np.testing.assert_allclose(np.asarray(fusec.jit(_mlp, backend="pallas", interpret=True)(q, x)),
                               np.asarray(want), rtol=2e-5, atol=2e-5)


def test_calibrate_transform_errors_name_the_matrix() -> None:
    params, batches = _setup()
    with pytest.raises(ValueError, match=r"\['l0'\]\['w'\]: rotate_block 128 does not divide its contracted size 64"):
        lowprec.calibrate(_mlp, params, batches, bits=4, group=32, rotate="hadamard")
    with pytest.raises(ValueError, match="rotate must be one of"):
        lowprec.calibrate(_mlp, params, batches, bits=4, rotate="givens")
    with pytest.raises(ValueError, match="rotate_block must be a power of two, got 48"):
        lowprec.calibrate(_mlp, params, batches, bits=4, rotate="hadamard", rotate_block=48)


def test_matrices_reading_one_input_share_their_transform() -> None:
    rng = np.random.default_rng(3)
    params = {"q": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32),
              "k": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)}
    model = lambda p, x: jnp.tanh(x @ p["q"]) * (x @ p["k"])  # noqa: E731 - siblings, as Q and K are
    _, batches = _setup()
    q = lowprec.calibrate(model, params, batches, bits=4, group=32, method="rtn", rotate="hadamard",
                          rotate_block=64, awq=True)
    assert q["q"].in_scale is not None, "AWQ found nothing to scale on inputs with loud channels"
    np.testing.assert_array_equal(np.asarray(q["q"].in_scale), np.asarray(q["k"].in_scale))
    x = batches[0][0][:4]
    fused = fusec.jit(model, backend="pallas", interpret=True)
    np.testing.assert_allclose(np.asarray(fused(q, x)), np.asarray(jax.jit(model)(lowprec.dequantize(q), x)),
                               rtol=2e-5, atol=2e-5)
    # A rotation alone stores nothing per matrix (its signs are a function of K): CSE then computes
    # x T once for both; AWQ's in_scale leaves are separate arguments, so x T is computed per matrix.
    rotated = lowprec.calibrate(model, params, batches, bits=4, group=32, method="rtn", rotate="hadamard",
                                rotate_block=64)
    entry = fused.lower(rotated, x).program.module.entry
    assert sum(op.opcode == "input_transform" for op in entry.ops) == 1
    np.testing.assert_allclose(np.asarray(fused(rotated, x)),
                               np.asarray(jax.jit(model)(lowprec.dequantize(rotated), x)), rtol=2e-5, atol=2e-5)


def test_transformed_matrices_save_and_load(tmp_path) -> None:
    from fusec.lowprec.store import load, save

    t = InputTransform(64, np.linspace(0.5, 2.0, 128).astype(np.float32))
    _, qa, _ = _transformed(128, 32, (0,), t)
    save(tmp_path / "q.safetensors", {"w": qa})
    back = load(tmp_path / "q.safetensors")["w"]
    assert back.rotate_block == 64 and back.in_scale is not None
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(qa.dequantize()))
