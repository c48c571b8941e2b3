"""GPU kernels stay inside their arrays: every kernel is lowered for cuda, its Triton IR read, and
every load and store of an array whose block can overhang must carry a mask (Pallas's Triton
lowering masks nothing by itself; interpret mode pads blocks and would hide it). Shapes divide no
block: M = 1, 3, 5 GEMVs, norms at widths 768 and 1000, decode-sized transformer blocks."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import fusec
from fusec import lowprec
from fusec.passes.tiling import tile_kernel_op
from fusec.runtime.jax_internals import triton_kernels_in
from fusec.runtime.ttir import memory_accesses
from tests.test_differential import programs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))


def _ident(name: str) -> str:
    return "k_" + "".join(ch if ch.isalnum() else "_" for ch in name)


def _input_refs(spec) -> int:
    """How many refs the kernel takes before its outputs (a low-bit weight is several)."""
    header = re.search(r"_body\((.*)\):", spec.source).group(1)
    # Keyword flags the wrapper sets (_on_gpu, _fusec_asm) are no refs.
    refs = len([n for n in header.split(",") if "=" not in n])
    # The call's outputs: the kernel's results, then any workspace (a split-K fixup's sums and counters).
    out_shape = re.search(r"out_shape=\[(.*)\],", spec.source)
    return refs - (out_shape.group(1).count("ShapeDtypeStruct") if out_shape else len(spec.out_types))


def _outputs_needing_masks(program) -> dict[str, set[int]]:
    """For each kernel, the output refs whose block overhangs the array, worked out from the kernel
    op's space and block alone (outputs written through a folded view are left out)."""
    need: dict[str, set[int]] = {}
    for op in program.module.all_ops():
        if op.opcode != "kernel" or "block" not in op.attr_dict:
            continue
        space, block, squeeze = op.attr("space"), op.attr("block"), op.attr("squeeze")
        folded = {int(j) for j, _ in op.attr("out_views", ())}
        if op.attr("kind") == "attention":  # writes through its labels (to_tile_attention), not the space
            folded = set(range(len(op.results)))
        spec = program.kernels[str(op.attr("callee"))]
        if spec.interpret:  # lowering for cuda uses the kernel's GPU tiles
            op = tile_kernel_op(op, {f.name: f for f in program.module.functions}, "gpu")
            space, block, squeeze = op.attr("space"), op.attr("block"), op.attr("squeeze")
        need[spec.name] = {_input_refs(spec) + j for j, result in enumerate(op.results) if j not in folded and any(
            d not in squeeze and n == space[d] and n % block[d] for d, n in enumerate(result.type.shape))}
    return need


def check_masks(fn, *args, static_argnums: tuple[int, ...] = ()) -> int:
    """Asserts every access to an overhanging array is masked; returns how many masked accesses
    the kernels' Triton IR holds."""
    program = fn.lower(*args).program
    lowered = jax.jit(fn, static_argnums=static_argnums).trace(*args).lower(lowering_platforms=("cuda",))
    # Identical kernels (repeated layers) share one spec, named after the first: one Triton kernel.
    specs = {_ident(spec.name): spec.for_gpu() or spec for spec in program.kernels.values()}
    need = {_ident(name): refs for name, refs in _outputs_needing_masks(program).items()}
    masked = 0
    kernels = triton_kernels_in(lowered)
    assert len(kernels) >= len(specs)
    for ttir, _ in kernels:
        name = re.search(r"tt\.func (?:public )?@([\w$.]+)", ttir).group(1)
        spec = specs[name]
        accesses = memory_accesses(ttir)
        for a in accesses:
            assert a.argument is not None, f"{name}: cannot trace {a.line}"
            if a.argument in spec.masked_refs or a.argument in need.get(name, ()):
                assert a.masked, f"kernel {spec.name}: unmasked {a.kind} of argument {a.argument}: {a.line}"
        stored = {a.argument for a in accesses if a.kind == "store"}
        assert need.get(name, set()) <= stored
        assert need.get(name, set()) <= set(spec.masked_refs), f"{spec.name}: overhanging outputs left unmasked"
        masked += sum(a.masked for a in accesses)
    return masked


def gpu(fn):
    return fusec.jit(fn, backend="pallas", interpret=False)


def _norms():
    def layernorm(x, g):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) * jax.lax.rsqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * g

    def rmsnorm(x, g):
        return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * g

    return {"layernorm": layernorm, "rmsnorm": rmsnorm}


@pytest.mark.parametrize("width", [768, 1000])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_norms_mask_partial_rows(norm: str, width: int) -> None:
    x, g = jnp.zeros((5, width), jnp.bfloat16), jnp.ones((width,), jnp.bfloat16)
    assert check_masks(gpu(_norms()[norm]), x, g) >= 2


def test_softmax_at_1000_masks() -> None:
    assert check_masks(gpu(lambda x: jax.nn.softmax(x, axis=-1)), jnp.zeros((7, 1000))) >= 2


@pytest.mark.parametrize("m", [1, 3, 5, 16])
def test_low_bit_gemv_masks_rows(m: int) -> None:
    w = np.random.default_rng(0).standard_normal((256, 200)).astype(np.float32)
    qw = lowprec.quantize({"w": jnp.asarray(w)}, lowprec.QuantSpec(4, 128))["w"]
    x = jnp.zeros((m, 256), jnp.float32)
    assert check_masks(gpu(lambda x, w: x @ w), x, qw) >= 1


@pytest.mark.parametrize("batch,seq", [(1, 1), (8, 512)])
def test_gpt2_block_masks(batch: int, seq: int) -> None:
    from quickstart import gpt2_block, init_params

    params = init_params(jax.random.key(0))
    x = jnp.zeros((batch, seq, 64))
    fn = gpu(jax.vmap(gpt2_block, in_axes=(0, None)))
    check_masks(fn, x, params)


@pytest.mark.parametrize("batch,seq", [(1, 1), (8, 512)])
def test_llama_block_masks(batch: int, seq: int) -> None:
    pytest.importorskip("flax")
    from llama_nnx import example_inputs, forward

    state, _ = example_inputs()
    x = jnp.zeros((batch, seq, 64))
    check_masks(gpu(jax.vmap(forward, in_axes=(None, 0))), state, x)


def test_masked_kernels_still_match_in_interpret_mode() -> None:
    x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 1000)), jnp.float32)
    g = jnp.asarray(np.random.default_rng(2).standard_normal(1000), jnp.float32)
    for norm in _norms().values():
        got = fusec.jit(norm, backend="pallas", interpret=True)(x, g)
        np.testing.assert_allclose(np.asarray(got), np.asarray(jax.jit(norm)(x, g)), rtol=2e-5, atol=2e-5)


@settings(max_examples=int(os.environ.get("FUSEC_BOUNDS_EXAMPLES", "25")), deadline=None)
@given(programs())
def test_random_programs_gpu_kernels_are_masked(program) -> None:
    from tests.test_differential import _run

    args = [jnp.zeros(s, jnp.float32) for s in program[0]]
    check_masks(gpu(lambda *a: _run(program, a)), *args)


def test_cuda_lowering_from_a_cpu_with_default_options_gets_gpu_kernels() -> None:
    """fusec.jit's defaults on a CPU tile for the interpreter; lowering for cuda still emits every
    kernel as GPU-tiled Triton, masked where its blocks overhang."""
    from quickstart import example_inputs, gpt2_block

    x, params = example_inputs()
    fn = fusec.jit(gpt2_block, backend="pallas")
    kernels = fn.lower(x, params).program.kernels
    assert all(spec.interpret for spec in kernels.values())
    text = jax.jit(fn).trace(x, params).lower(lowering_platforms=("cuda",)).as_text()
    # The two layer norms are one kernel, attention another: 7 kernel calls, 6 Triton kernels.
    distinct = fn.lower(x, params).program.distinct_kernels
    assert len(kernels) == 7 and text.count("__gpu$xla.gpu.triton") == len(distinct) == 6
    check_masks(fn, x, params)
    np.testing.assert_allclose(np.asarray(fn(x, params)), np.asarray(jax.jit(gpt2_block)(x, params)),
                               rtol=2e-5, atol=2e-5)
