"""Every Triton-backend GPU kernel of the test corpus and the examples: masked wherever a block
overhangs its array (checked on the generated source), lowered for ``cuda`` as jax-triton custom
calls (with the CUDA plugin; skipped with the pip command without it) and compiled for sm_80 and
sm_90 with 0 spills. The default run takes a sample of the corpus; ``-m slow`` takes all of it and
the examples."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusec
from fusec.runtime.jax_internals import gpu_lowering_target
from fusec.runtime.triton_compile import compile_triton_kernel
from tests.corpus import CORPUS, Case
from tests.test_triton_backend import _check_source_masks

SAMPLE = ("mlp", "layernorm", "softmax", "attention_causal", "rotary_embedding", "reductions")
SMOKE = ("test_corpus_kernels_lower_mask_and_compile",)


def _gpu_kernels(fn, args, static_argnums=()) -> list:
    """The distinct GPU twins of the kernels of ``fn`` on ``args`` (all Triton-backend kernels)."""
    lowered = fusec.jit(fn, backend="triton", static_argnums=static_argnums).lower(*args)
    gpus = [spec.for_gpu() for spec in lowered.program.distinct_kernels]
    assert all(g is not None and g.backend == "triton" for g in gpus), [g and g.backend for g in gpus]
    return gpus


def _lower_and_compile(fn, args, static_argnums=()) -> int:
    from fusec.runtime.triton_call import triton_backend_problem

    gpus = _gpu_kernels(fn, args, static_argnums)
    for gpu in gpus:
        _check_source_masks(gpu.backend_kernel)
        for arch in (80, 90):
            compiled = compile_triton_kernel(gpu.backend_kernel, arch, sass=False)
            assert compiled.resources.spills == 0, (gpu.name, arch, compiled.resources)
    problem = triton_backend_problem()
    if problem is None:
        with gpu_lowering_target("cuda"):
            text = jax.jit(fusec.jit(fn, backend="triton", static_argnums=static_argnums),
                           static_argnums=static_argnums).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("triton_kernel_call") >= len(gpus)
        assert "__gpu$xla.gpu.triton" not in text  # no kernel fell back to Pallas
    return len(gpus)


def _corpus_params() -> list:
    return [pytest.param(c, id=c.name, marks=[] if c.name in SAMPLE else [pytest.mark.slow]) for c in CORPUS]


@pytest.mark.parametrize("case", _corpus_params())
def test_corpus_kernels_lower_mask_and_compile(case: Case) -> None:
    args = case.make_args(jnp.float32, np.random.default_rng(sum(map(ord, case.name))))
    # (Programs of views and XLA ops alone have no kernels: nothing to check there.)
    assert _lower_and_compile(case.fn, args, case.static_argnums) >= (case.name in SAMPLE)


@pytest.mark.slow
@pytest.mark.parametrize("stem", ["quickstart", "llama_nnx", "linen_block", "equinox_block", "haiku_block"])
def test_example_kernels_lower_mask_and_compile(stem: str) -> None:
    from tests.test_examples import EXAMPLES, example_args, load_example

    path = next(p for p in EXAMPLES if p.stem == stem)
    module = load_example(path)
    assert _lower_and_compile(getattr(module, module.EXAMPLE_FUNCTION), example_args(module)) >= 1
