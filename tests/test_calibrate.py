"""Calibrated quantization: Hessians collected from the jaxpr, GPTQ and scale search against RTN,
bit budgets, the fused kernels on calibrated weights, and the errors for bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusec
from fusec import lowprec
from fusec.lowprec.calibrate import storage_bits
from fusec.lowprec.gptq import gptq, output_error
from fusec.lowprec.hessian import collect_hessians
from fusec.lowprec.quantize import dequantize_codes
from fusec.lowprec.refit import refit_scales


@jax.jit
def _hidden(params, x):  # a nested jit with a custom_jvp (relu) inside: the interpreter inlines both
    return jax.nn.relu(x @ params["l0"]["w"] + params["l0"]["b"])


def _mlp(params, x):
    # l1 is stored [out, in] and read transposed, as Equinox stores weights.
    return _hidden(params, x) @ params["l1"]["w"].T


def _params(seed: int = 0, d_in: int = 64, d_hidden: int = 128, d_out: int = 32) -> dict:
    rng = np.random.default_rng(seed)
    return {"l0": {"w": jnp.asarray(rng.standard_normal((d_in, d_hidden)) * 0.2, jnp.float32),
                   "b": jnp.asarray(rng.standard_normal(d_hidden) * 0.1, jnp.float32)},
            "l1": {"w": jnp.asarray(rng.standard_normal((d_out, d_hidden)) * 0.2, jnp.float32)}}


def _batches(n: int = 3, rows: int = 64, d_in: int = 64, seed: int = 1) -> list[tuple[jax.Array]]:
    # Correlated inputs with uneven scales, where error feedback has something to exploit.
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d_in, d_in)) * np.linspace(0.2, 2.0, d_in)
    return [(jnp.asarray(rng.standard_normal((rows, d_in)) @ mix, jnp.float32),) for _ in range(n)]


def test_hessians_are_the_inputs_gram_matrices() -> None:
    params, batches = _params(), _batches()
    hs, skipped = collect_hessians(_mlp, params, batches)
    assert set(hs) == {"['l0']['w']", "['l1']['w']"} and hs["['l1']['w']"].contract == (1,)
    x = np.concatenate([np.asarray(b[0], np.float64) for b in batches])
    hidden = np.concatenate([np.asarray(_hidden(params, *b), np.float64) for b in batches])
    np.testing.assert_allclose(hs["['l0']['w']"].h, x.T @ x, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(hs["['l1']['w']"].h, hidden.T @ hidden, rtol=1e-4, atol=1e-2)
    assert hs["['l0']['w']"].rows == x.shape[0] and "['l0']['b']" not in skipped  # 1-D: never a candidate


def _output_error(params, qparams, batches) -> float:
    ref = np.concatenate([np.asarray(_mlp(params, *b)) for b in batches])
    got = np.concatenate([np.asarray(_mlp(lowprec.dequantize(qparams), *b)) for b in batches])
    return float(np.mean((got - ref) ** 2))


@pytest.mark.parametrize("bits,fmt,act_order,sequential", [(3, "int", False, True), (4, "uint", False, False),
                                                          (3, "nf", True, False), (3, "lut", False, False)])
def test_gptq_beats_round_to_nearest_on_the_calibration_outputs(bits: int, fmt: str, act_order: bool,
                                                                sequential: bool) -> None:
    params, batches = _params(), _batches()
    kw = dict(bits=bits, group=32, fmt=fmt)
    rtn = lowprec.calibrate(_mlp, params, batches, method="rtn", search=False, **kw)
    searched = lowprec.calibrate(_mlp, params, batches, method="rtn", **kw)
    gptq, report = lowprec.calibrate(_mlp, params, batches, act_order=act_order, sequential=sequential,
                                     with_report=True, **kw)
    errors = [_output_error(params, q, batches) for q in (rtn, searched, gptq)]
    assert errors[2] < errors[1] <= errors[0] * 1.0001, errors
    assert all(m.output_error < m.rtn_error for m in report.matrices)
    if fmt == "lut":
        return  # a learned table: no lowprec.quantize spec to compare with
    # RTN without search is exactly lowprec.quantize (with the axes the matmuls contract).
    axes = lowprec.contraction_axes(_mlp, params, *batches[0])
    plain = lowprec.quantize(params, lowprec.QuantSpec(bits, 32, fmt), axes=axes)
    for a, b in zip(jax.tree.leaves(rtn), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_calibrated_leaves_run_through_the_fused_kernels() -> None:
    params, batches = _params(), _batches(n=1)
    # Mixed widths and learned lookup tables, the least common path through the kernels.
    q = lowprec.calibrate(_mlp, params, batches, budget=4.0, group=32, fmt="lut", act_order=True)
    assert all(isinstance(q[k]["w"], lowprec.QuantizedArray) for k in ("l0", "l1"))
    assert {q[k]["w"].fmt.family for k in ("l0", "l1")} == {"lut"}
    assert q["l1"]["w"].contract == (1,) and q["l1"]["w"].shape == (32, 128)
    x = batches[0][0][:8]
    ref = jax.jit(_mlp)(lowprec.dequantize(q), x)
    got = fusec.jit(_mlp, backend="pallas", interpret=True)(q, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5, atol=2e-5)


def test_act_order_codes_decode_in_natural_order() -> None:
    rng = np.random.default_rng(3)
    w, x = rng.standard_normal((64, 16)), rng.standard_normal((256, 64)) * np.linspace(0.1, 3, 64)
    h = x.T @ x
    fmt = lowprec.Format("int", 4)
    q = gptq(w, h, fmt, 16, act_order=True)
    plain = gptq(w, h, fmt, 16)
    errs = [output_error(w, dequantize_codes(c), h) for c in (q, plain)]
    rtn = output_error(w, dequantize_codes(lowprec.quantize_codes(w, fmt, 16, "bf16")), h)
    assert max(errs) < rtn and q.codes.shape == w.shape


@pytest.mark.parametrize("family", ["int", "nf", "uint"])
def test_scale_refit_keeps_codes_and_finds_the_least_squares_scales(family: str) -> None:
    rng = np.random.default_rng(4)
    w, x = rng.standard_normal((128, 24)), rng.standard_normal((512, 128)) * np.linspace(0.1, 3, 128)
    h = x.T @ x
    q = gptq(w, h, lowprec.Format(family, 3), 32, "f32")
    r = refit_scales(w, h, q, "f32")
    assert np.array_equal(r.codes, q.codes) and r.scales.dtype == np.float32
    err = lambda c: output_error(w, dequantize_codes(c), h)  # noqa: E731
    assert err(r) < err(q)
    # A least-squares optimum: nudging any one scale up or down makes the output error larger.
    for j, n in [(0, 0), (3, 5), (2, 23)]:
        for f in (0.99, 1.01):
            s = r.scales.copy()
            s[j, n] *= f
            assert err(r) <= err(type(r)(r.codes, s, r.zeros, r.fmt, r.group))


def test_calibrate_with_refit_is_no_worse_per_matrix() -> None:
    params, batches = _params(), _batches(n=1)
    kw = dict(bits=3, group=32, with_report=True)
    _, plain = lowprec.calibrate(_mlp, params, batches, **kw)
    _, refit = lowprec.calibrate(_mlp, params, batches, refit=True, **kw)
    assert all(m.method == "gptq+search+act+refit" for m in refit.matrices)
    assert all(a.output_error <= b.output_error for a, b in zip(refit.matrices, plain.matrices))


def test_a_learned_table_counts_in_the_stored_bits() -> None:
    assert storage_bits(64, 16, 3, 32, "lut", "bf16") - storage_bits(64, 16, 3, 32, "nf", "bf16") == 8 * 32
    assert storage_bits(64, 16, 3, 32, "int", "bf16") == storage_bits(64, 16, 3, 32, "nf", "bf16")


def test_a_budget_mixes_widths_and_keeps_to_it() -> None:
    params, batches = _params(d_hidden=256), _batches()
    q, report = lowprec.calibrate(_mlp, params, batches, budget=4.0, group=32, with_report=True)
    assert report.bits_per_weight <= 4.0
    assert len({m.bits for m in report.matrices}) == 2  # 4.0 sits between two widths' costs
    for m in report.matrices:  # the counted size is the stored size
        leaf = q["l0"]["w"] if m.path == "['l0']['w']" else q["l1"]["w"]
        k, n = leaf.packed_shape
        assert storage_bits(k, n, m.bits, 32, "int", "bf16") == 8 * leaf.nbytes
    # A wider budget, with group sizes to choose from as well: less error, still within budget.
    wide = lowprec.calibrate(_mlp, params, batches, budget=5.5, group=(32, 64), widths=(4, 5, 6),
                             with_report=True)[1]
    assert wide.mean_output_error < report.mean_output_error and wide.bits_per_weight <= 5.5
    assert "bits per weight (scales, zero-points and learned tables counted)" in str(report)


def test_bad_input_is_named() -> None:
    params, batches = _params(), _batches(n=2)
    with pytest.raises(ValueError, match="at least one calibration batch"):
        lowprec.calibrate(_mlp, params, [], bits=4)
    bad = [batches[0], (jnp.ones((4, 63)),)]
    with pytest.raises(ValueError, match="calibration batch 1: apply_fn"):
        lowprec.calibrate(_mlp, params, bad, bits=4)
    for budget in (0.5, 9):
        with pytest.raises(ValueError, match="budget must be an average of 1 to 8 bits"):
            lowprec.calibrate(_mlp, params, batches, budget=budget)
    with pytest.raises(ValueError, match="below the least"):
        lowprec.calibrate(_mlp, params, batches, budget=1.5, group=32)
    with pytest.raises(ValueError, match="exactly one of bits"):
        lowprec.calibrate(_mlp, params, batches)
    with pytest.raises(ValueError, match="bit width must be an int in 1..8"):
        lowprec.calibrate(_mlp, params, batches, bits=9)
    with pytest.raises(ValueError, match="no matrix to quantize"):
        lowprec.calibrate(_mlp, params, batches, bits=4, where=lambda p, leaf: "nothing" in p)
    with pytest.raises(ValueError, match="no matrix to quantize.*not a whole number of 48-row groups"):
        lowprec.calibrate(_mlp, params, batches, bits=4, group=48)
    table = {"emb": jnp.ones((16, 64)), **params}
    with pytest.raises(ValueError, match=r"where selects \[\"\['emb'\]\"\], but no matmul reads"):
        lowprec.calibrate(lambda p, ids: _mlp(p, p["emb"][ids]), table, [(jnp.arange(4),)], bits=4,
                          where=lambda p, leaf: leaf.ndim == 2)


def test_embeddings_read_by_gather_stay_float() -> None:
    params = {"emb": jnp.asarray(np.random.default_rng(0).standard_normal((16, 64)), jnp.float32), **_params()}
    q, report = lowprec.calibrate(lambda p, ids: _mlp(p, p["emb"][ids]), params, [(jnp.arange(16),)], bits=4,
                                  group=32, with_report=True)
    assert not lowprec.is_quantized(q["emb"]) and ("['emb']", "no matmul reads it") in report.left_float


def test_flax_nnx_model_calibrates() -> None:
    nnx = pytest.importorskip("flax.nnx")

    class Mlp(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.up, self.down = nnx.Linear(64, 128, rngs=rngs), nnx.Linear(128, 64, rngs=rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            return self.down(jax.nn.gelu(self.up(x)))

    graphdef, state = nnx.split(Mlp(nnx.Rngs(0)))
    forward = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    batches = _batches()
    q, report = lowprec.calibrate(forward, state, batches, bits=3, group=32, with_report=True)
    assert len(report.matrices) == 2 and all(m.output_error < m.rtn_error for m in report.matrices)
    x = batches[0][0][:8]
    got = fusec.jit(forward, backend="pallas", interpret=True)(q, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(forward(lowprec.dequantize(q), x)), rtol=2e-5, atol=2e-5)
