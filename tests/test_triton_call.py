"""The Triton backend's GPU path on hand-written kernels: ``call_triton_kernel`` through jax-triton,
lowered for ``cuda`` on this machine (it needs the CUDA plugin package, not a GPU), and run on a GPU
against NumPy where there is one."""

from __future__ import annotations

import warnings
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusec.runtime import triton_call
from fusec.runtime.jax_internals import gpu_lowering_target
from tests.triton_samples import SAMPLES, VECTOR_ADD

PROBLEM = triton_call.triton_backend_problem()
needs_lowering = pytest.mark.skipif(PROBLEM is not None, reason=f"Triton backend unavailable: {PROBLEM}")


def _lower(fn, *args):
    with gpu_lowering_target("cuda"):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def _custom_calls(lowered) -> list[str]:
    return [line for line in lowered.as_text().splitlines() if "stablehlo.custom_call" in line]


@needs_lowering
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_samples_lower_for_cuda_to_one_triton_kernel_call_each(name: str) -> None:
    sample = SAMPLES[name]
    args = [jnp.asarray(a) for a in sample.inputs()]
    lowered = _lower(lambda *a: triton_call.call_triton_kernel(sample.kernel, *a), *args)
    calls = _custom_calls(lowered)
    assert len(calls) == 1 and "triton_kernel_call" in calls[0], calls
    # One result per kernel output, with its shape and dtype.
    out = jax.eval_shape(lambda *a: triton_call.call_triton_kernel(sample.kernel, *a), *args)
    assert [(o.shape, o.dtype) for o in out] == [(s.shape, np.dtype(s.dtype)) for s in sample.kernel.outputs]


@needs_lowering
def test_an_unused_output_and_an_explicit_sm80_target_lower_on_every_jax() -> None:
    # Dropping an output runs jax-triton's DCE rule (adapted on jax 0.12); jax-triton's zeroed_outputs
    # deprecation (0.4) stays inside call_triton_kernel.
    sample = SAMPLES["column_sums"]
    x = jnp.asarray(sample.inputs()[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        lowered = _lower(lambda a: triton_call.call_triton_kernel(sample.kernel, a, compute_capability=80)[1], x)
    assert len(_custom_calls(lowered)) == 1


@needs_lowering
def test_the_kernel_call_composes_with_jax_around_it() -> None:
    x, y = (jnp.asarray(a) for a in SAMPLES["vector_add"].inputs())

    def f(a, b):
        (s,) = triton_call.call_triton_kernel(VECTOR_ADD, a * 2.0, b)
        return jnp.tanh(s).sum()

    text = _lower(f, x, y).as_text()
    assert "triton_kernel_call" in text and "stablehlo.tanh" in text


def test_arguments_are_checked_by_name_and_position() -> None:
    x = jnp.ones(1000, jnp.float32)
    with pytest.raises(ValueError, match="takes 2 arrays, got 1"):
        triton_call.call_triton_kernel(VECTOR_ADD, x)
    with pytest.raises(ValueError, match=r"argument 1: expected float32\[1000\], got float16\[1000\]"):
        triton_call.call_triton_kernel(VECTOR_ADD, x, x.astype(jnp.float16))
    with pytest.raises(ValueError, match=r"argument 0: expected float32\[1000\], got float32\[999\]"):
        triton_call.call_triton_kernel(VECTOR_ADD, x[:999], x)
    with pytest.raises(ValueError, match="argument 1: expected an array, got float"):
        triton_call.call_triton_kernel(VECTOR_ADD, x, 1.0)
    with pytest.raises(ValueError, match="zeroed_outputs \\[1\\] name no output"):
        triton_call.call_triton_kernel(replace(VECTOR_ADD, zeroed_outputs=(1,)), x, x)


@needs_lowering
def test_a_constexpr_named_like_a_triton_call_keyword_is_refused() -> None:
    kernel = replace(VECTOR_ADD, constexprs=(("N", 1000), ("grid", 256)))
    x = jnp.ones(1000, jnp.float32)
    with pytest.raises(ValueError, match=r"constexpr names \['grid'\] collide"):
        triton_call.call_triton_kernel(kernel, x, x)


def test_the_backend_problem_is_one_line_naming_the_fix() -> None:
    problem = triton_call.triton_backend_problem()
    if problem is None:
        # Only where the probe lowered: then a real kernel lowers too.
        x = jnp.ones(1000, jnp.float32)
        assert "triton_kernel_call" in _lower(lambda a: triton_call.call_triton_kernel(VECTOR_ADD, a, a)[0],
                                              x).as_text()
    else:
        assert "\n" not in problem
        if "plugin" in problem or "does not load" in problem:
            assert triton_call.plugin_install_command() in problem


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_samples_run_on_the_gpu_like_numpy(name: str) -> None:
    sample = SAMPLES[name]
    inputs = sample.inputs(seed=1)
    fn = jax.jit(lambda *a: triton_call.call_triton_kernel(sample.kernel, *a))
    got = fn(*map(jnp.asarray, inputs))
    for g, w, sig in zip(got, sample.reference(*inputs), sample.kernel.outputs):
        assert g.shape == tuple(sig.shape)
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-4)
    # Zeroed outputs are zeroed on every launch, not only the first.
    again = fn(*map(jnp.asarray, inputs))
    for g, h in zip(got, again):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-5, atol=1e-4)



def test_triton_backend_lowers_pallas_kernels_for_cuda_where_jax_triton_cannot(monkeypatch) -> None:
    """Where the installed jax-triton cannot lower (jax 0.12 without fusec's rule adaptation, say),
    lowering for cuda emits the same tile programs as Pallas kernels, with a warning and a report
    line saying why: never a crash, never a silent switch."""
    import fusec
    from fusec.runtime.jax_internals import triton_kernels_in

    reason = "jax-triton 0.4.1 with jax 0.12.0 fails: TypeError: takes 2 positional arguments but 3 were given"
    monkeypatch.setattr(triton_call, "triton_backend_problem", lambda: reason)
    fn = fusec.jit(lambda x: jnp.tanh(x) * 2.0, backend="triton")
    x = jnp.ones((1000,), jnp.float32)
    with pytest.warns(UserWarning, match="lowers for cuda as a Pallas kernel"):
        lowered = jax.jit(fn).trace(x).lower(lowering_platforms=("cuda",))
    assert triton_kernels_in(lowered)  # Pallas's Triton IR custom calls, not jax-triton's
    report = fn.inspect(x)
    assert report.backend == "triton" and report.gpu_backend.startswith("pallas") and reason in report.gpu_backend
    assert "GPU kernels: pallas" in str(report)
