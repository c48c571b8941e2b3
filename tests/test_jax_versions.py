"""What differs between the JAX releases fusec supports (0.10, 0.11, 0.12): each difference is
decided in fusec/runtime/jax_internals.py (or a frontend rule for a newer primitive), and each test
here asserts the branch the running JAX must take."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusec
from fusec.runtime import jax_internals
from tests.helpers import assert_trees_close

VERSION = tuple(int(p) for p in jax.__version__.split(".")[:2])
HAS_GPU = any(d.platform == "gpu" for d in jax.devices())
# The smoke subset (CI's leg on the newest jax) takes every version branch here: they are quick.
SMOKE = ("test_the_running_jax_is_a_supported_one", "test_pallas_triton_gpu_info_branch",
         "test_cuda_lowering_gets_an_abstract_h100_only_where_jax_needs_one",
         "test_kernels_lower_for_cuda_on_this_machine", "test_newer_primitives_compile_without_fallbacks",
         "test_dce_rule_arity_branch", "test_jax_triton_kernels_lower_for_cuda_on_this_machine",
         "test_jax_tritons_dce_rule_takes_what_the_running_jax_passes",
         "test_call_triton_kernel_lowers_for_cuda_or_says_why_not")


def test_the_running_jax_is_a_supported_one() -> None:
    assert (0, 10) <= VERSION < (0, 13), jax.__version__


def test_weak_types_come_from_jax_internals_on_every_release() -> None:
    assert jax_internals._convert_with_weak_type is not None
    assert jax_internals.make_weak(jnp.float32(1.0)).weak_type


def test_pallas_triton_gpu_info_branch() -> None:
    # JAX 0.11 and later ask the device for the compute capability; 0.10 assumes sm_90 itself.
    assert jax_internals.PALLAS_TRITON_ASKS_GPU_INFO == (VERSION >= (0, 11))


@pytest.mark.skipif(HAS_GPU, reason="the abstract GPU is only for machines without one")
def test_cuda_lowering_gets_an_abstract_h100_only_where_jax_needs_one() -> None:
    from jax._src import mesh as mesh_lib

    with jax_internals.gpu_lowering_target("cpu"):
        assert mesh_lib.get_abstract_mesh().abstract_device is None
    with jax_internals.gpu_lowering_target("cuda"):
        device = mesh_lib.get_abstract_mesh().abstract_device
        if VERSION >= (0, 11):
            assert device.device_kind == "NVIDIA H100" and device.platform == "gpu"
        else:
            assert device is None
    assert mesh_lib.get_abstract_mesh().abstract_device is None


def test_kernels_lower_for_cuda_on_this_machine() -> None:
    f = fusec.jit(lambda x: jax.nn.gelu(x) * 2.0, backend="pallas")
    lowered = jax.jit(f).trace(jnp.ones((8, 1000))).lower(lowering_platforms=("cuda",))
    kernels = jax_internals.triton_kernels_in(lowered)
    assert kernels and all("tt.func" in ttir for ttir, _ in kernels)


def _log2(x):
    return jnp.log2(jnp.abs(x) + 0.5)


def _tanh_grad(x):
    return jax.grad(lambda y: jnp.sum(jnp.tanh(y)))(x)


def _asin_grad(x):
    return jax.grad(lambda y: jnp.sum(jnp.arcsin(y * 0.5)))(x)


def _polyval(x):
    return jnp.polyval(jnp.array([0.5, -1.0, 2.0, 3.0]), x)


def _long_polynomial(x):
    return jnp.polyval(jnp.arange(1.0, 12.0) / 10.0, x)


# Each program, and the primitive the JAX release that added it puts in its jaxpr.
NEWER_PRIMITIVES = [(_log2, "log2", (0, 11)), (_tanh_grad, "one_minus_square", (0, 11)),
                    (_asin_grad, "one_minus_square", (0, 11)), (_polyval, "polynomial", (0, 12)),
                    (_long_polynomial, "polynomial", (0, 12))]


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("fn,primitive,since", NEWER_PRIMITIVES, ids=lambda v: getattr(v, "__name__", None))
def test_newer_primitives_compile_without_fallbacks(fn, primitive, since, backend) -> None:
    x = jnp.asarray(np.random.default_rng(0).uniform(-1.5, 1.5, (4, 33)), jnp.float32)
    x = x.at[0, :3].set(jnp.array([jnp.inf, -jnp.inf, jnp.nan]))
    text = str(jax.make_jaxpr(fn)(x))
    assert (primitive in text) == (VERSION >= since), (primitive, jax.__version__)
    compiled = fusec.jit(fn, backend=backend)
    assert_trees_close(compiled(x), jax.jit(fn)(x), loose=backend == "pallas")
    fallbacks = compiled.lower(x).fallbacks
    if VERSION >= since:  # (before 0.12, jnp.polyval is a scan, which stays JAX's)
        assert not fallbacks, fallbacks


def test_dce_rule_arity_branch() -> None:
    # JAX 0.12 passes DCE rules the inputs' liveness too; jax-triton 0.4.1's rule is adapted for it.
    assert jax_internals.DCE_RULES_TAKE_LIVE_INPUTS == (VERSION >= (0, 12))


def test_jax_triton_kernels_lower_for_cuda_on_this_machine() -> None:
    try:
        jt = jax_internals.load_jax_triton()
    except ImportError as e:  # jax-triton 0.3 on a CPU-only jaxlib
        pytest.skip(f"jax-triton does not load here: {e}")
    if not hasattr(jt.triton_lib.triton_kernel_call_lib, "TritonKernel"):
        pytest.skip("lowering triton_call needs the CUDA plugin: pip install --no-deps jax-cuda12-plugin==<jaxlib>")
    import triton
    import triton.language as tl

    @triton.jit
    def add(x_ptr, y_ptr, o_ptr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(o_ptr + i, tl.load(x_ptr + i) + tl.load(y_ptr + i))

    def f(x, y):
        out = jax.ShapeDtypeStruct(x.shape, x.dtype)
        return jt.triton_call(x, y, kernel=add, out_shape=out, grid=(1,), BLOCK=8)

    x = jnp.ones(8)
    with jax_internals.gpu_lowering_target("cuda"):
        lowered = jax.jit(f).trace(x, x).lower(lowering_platforms=("cuda",))
    assert "triton_kernel_call" in lowered.as_text()


def test_jax_tritons_dce_rule_takes_what_the_running_jax_passes() -> None:
    try:
        jt = jax_internals.load_jax_triton()
    except ImportError as e:  # jax-triton 0.3 on a CPU-only jaxlib
        pytest.skip(f"jax-triton does not load here: {e}")
    import inspect

    from jax._src.interpreters import partial_eval as pe

    rule = pe.dce_rules.get(jt.triton_lib.triton_kernel_call_p)
    if rule is None:  # jax-triton 0.3 registers none: JAX's default rule applies
        assert jt.__version__.startswith("0.3."), jt.__version__
        return
    arity = 3 if jax_internals.DCE_RULES_TAKE_LIVE_INPUTS else 2
    assert len(inspect.signature(rule).parameters) == arity, jax.__version__


def test_call_triton_kernel_lowers_for_cuda_or_says_why_not() -> None:
    from fusec.runtime import triton_call
    from tests.triton_samples import SAMPLES

    problem = triton_call.triton_backend_problem()
    if problem is not None:
        # The only accepted reason on a supported release: the CUDA plugin is not installed.
        assert "\n" not in problem and triton_call.plugin_install_command() in problem, problem
        pytest.skip(problem)
    sample = SAMPLES["column_sums"]  # two outputs, one zeroed, one dropped below (DCE)
    x = jnp.asarray(sample.inputs()[0])
    with jax_internals.gpu_lowering_target("cuda"):
        lowered = jax.jit(lambda a: triton_call.call_triton_kernel(sample.kernel, a)[1] + 1.0).trace(x).lower(
            lowering_platforms=("cuda",))
    calls = [line for line in lowered.as_text().splitlines() if "custom_call @triton_kernel_call" in line]
    assert len(calls) == 1, lowered.as_text()


def test_a_failed_jax_triton_import_leaves_triton_cache_dir_as_it_was(monkeypatch, tmp_path) -> None:
    """jax-triton 0.3 clears TRITON_CACHE_DIR on import and then fails on a CPU-only jaxlib; every
    later Triton compile in the process would then fail ("Could not create or locate cache dir")."""
    import importlib.abc
    import os
    import sys

    class ClearsThenFails(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "jax_triton":
                os.environ["TRITON_CACHE_DIR"] = ""
                raise ImportError("no GPU kernel-call library")
            return None

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.delitem(sys.modules, "jax_triton", raising=False)
    monkeypatch.setattr(sys, "meta_path", [ClearsThenFails(), *sys.meta_path])
    with pytest.raises(ImportError):
        jax_internals.load_jax_triton()
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path)
