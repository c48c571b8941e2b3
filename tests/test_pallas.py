"""The Pallas backend: every kernel lowers for cuda, edge cases match jax.jit, grad and vmap work
through kernels, and the GPT-2 block fuses."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusec
from fusec.passes.cost import FREE_OPS, function_cost
from tests.corpus import CORPUS, Case
from tests.helpers import assert_trees_close
from tests.test_bounds import check_masks
from tests.test_corpus import _args, _float_argnums, _float_loss

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))


def pallas(fn, **kw):
    return fusec.jit(fn, backend="pallas", interpret=True, **kw)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.name)
def test_every_corpus_kernel_lowers_for_cuda(case: Case, dtype: str) -> None:
    args = _args(case, dtype)
    fn = fusec.jit(case.fn, static_argnums=case.static_argnums, backend="pallas", interpret=False)
    lowered = jax.jit(fn, static_argnums=case.static_argnums).trace(*args).lower(lowering_platforms=("cuda",))
    kernels = fn.lower(*args).program.kernels
    text = lowered.as_text()
    assert text.count("__gpu$xla.gpu.triton") >= len(fn.lower(*args).program.distinct_kernels)
    for spec in kernels.values():
        assert "pl.pallas_call(" in spec.source
    check_masks(fn, *args, static_argnums=case.static_argnums)


EDGE_CASES = [
    ("non_dividing", lambda x, w: jax.nn.softmax(jnp.tanh(x @ w), axis=-1), [(37, 19), (19, 45)]),
    ("size_one_dims", lambda x, w: jax.nn.relu(x @ w) + x.sum(-1, keepdims=True), [(1, 1), (1, 1)]),
    ("vector_rows", lambda x, w: (x @ w) * 2 - 1, [(1, 7), (7, 1)]),
    ("zero_size", lambda x, w: jnp.exp(x @ w) + 1, [(0, 5), (5, 3)]),
    ("zero_contraction", lambda x, w: jnp.exp(x @ w) + 1, [(4, 0), (0, 3)]),
]


@pytest.mark.parametrize("name,fn,shapes", EDGE_CASES, ids=[e[0] for e in EDGE_CASES])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_edge_shapes_match(name, fn, shapes, dtype) -> None:
    rng = np.random.default_rng(1)
    args = [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]
    assert_trees_close(pallas(fn)(*args), jax.jit(fn)(*args), loose=True)


def test_nan_inf_propagate_like_jax() -> None:
    x = jnp.array([[0.0, jnp.nan, jnp.inf, -jnp.inf, 1.0, -2.0, 3.0]] * 3)
    fns = [lambda x: jax.nn.softmax(x, axis=-1), lambda x: jnp.maximum(x, 0) * 2, lambda x: x.max(-1),
           lambda x: jnp.where(jnp.isfinite(x), x, 0.0).sum(-1), lambda x: jnp.exp(x) / (1 + jnp.exp(x))]
    for fn in fns:
        assert_trees_close(pallas(fn)(x), jax.jit(fn)(x), loose=True)


def test_mixed_dtypes_match() -> None:
    def fn(x, w, b, n):
        h = (x.astype(jnp.bfloat16) @ w).astype(jnp.float32) + b
        return jnp.where(n > 2, h, -h).astype(jnp.float16), (n * 3 + (n >> 1)).astype(jnp.int8)

    rng = np.random.default_rng(2)
    args = (jnp.asarray(rng.standard_normal((6, 8)), jnp.float32),
            jnp.asarray(rng.standard_normal((8, 5)), jnp.bfloat16),
            jnp.asarray(rng.standard_normal(5), jnp.float32),
            jnp.asarray(rng.integers(0, 5, (6, 5)), jnp.int32))
    (got_h, got_n), (want_h, want_n) = pallas(fn)(*args), jax.jit(fn)(*args)
    assert got_h.dtype == want_h.dtype == jnp.float16 and got_n.dtype == want_n.dtype == jnp.int8
    # h went through a bfloat16 matmul: bfloat16's tolerance applies, whatever the final dtype.
    np.testing.assert_allclose(np.asarray(got_h, np.float32), np.asarray(want_h, np.float32), rtol=2e-2, atol=2e-2)
    np.testing.assert_array_equal(got_n, want_n)


GRAD_VMAP = ["mlp", "layernorm", "rmsnorm", "softmax", "log_softmax", "gelu_tanh", "swiglu", "attention_causal",
             "einsum_batched_matmul", "cross_entropy", "rotary_embedding", "where_clip"]


@pytest.mark.parametrize("name", GRAD_VMAP)
def test_grad_and_vmap_through_kernels(name: str) -> None:
    case = next(c for c in CORPUS if c.name == name)
    args = _args(case, "f32")
    fused = pallas(case.fn)
    assert fused.lower(*args).program.kernels, "expected at least one kernel"
    argnums = _float_argnums(args, ())
    assert_trees_close(jax.grad(_float_loss(fused, ()), argnums=argnums)(*args),
                       jax.grad(_float_loss(jax.jit(case.fn), ()), argnums=argnums)(*args), loose=True)
    batched = jnp.stack([args[0], args[0] * 0.5]) if jnp.issubdtype(args[0].dtype, jnp.floating) \
        else jnp.stack([args[0], args[0]])
    in_axes = (0,) + (None,) * (len(args) - 1)
    assert_trees_close(jax.vmap(fused, in_axes=in_axes)(batched, *args[1:]),
                       jax.vmap(jax.jit(case.fn), in_axes=in_axes)(batched, *args[1:]), loose=True)


def test_kernel_primitive_under_vmap_and_jvp_directly() -> None:
    """The kernel primitive's own batching and JVP rules (not only the program-level rule)."""
    from fusec.runtime.primitive import call_kernel

    f = lambda x, b: jnp.tanh(x * 2 + b)  # noqa: E731
    x, b = jnp.linspace(-1, 1, 24).reshape(4, 6), jnp.linspace(0, 1, 6)
    spec = next(iter(pallas(f).lower(x, b).program.kernels.values()))
    b2 = b.reshape(1, 6)
    run = lambda xx: call_kernel(spec, [xx, b2])[0]  # noqa: E731
    xs = jnp.stack([x, -x, x * 3])
    assert_trees_close(jax.vmap(run)(xs), jax.vmap(lambda xx: f(xx, b))(xs), loose=True)
    assert_trees_close(jax.jvp(run, (x,), (jnp.ones_like(x),)),
                       jax.jvp(lambda xx: f(xx, b), (x,), (jnp.ones_like(x),)), loose=True)


def _gpt2_counts(backend_interpret: bool):
    from quickstart import example_inputs, gpt2_block

    x, p = example_inputs()
    fn = fusec.jit(gpt2_block, backend="pallas", interpret=backend_interpret)
    lowered = fn.lower(x, p)
    entry = lowered.program.module.entry
    kernels = sum(op.opcode == "kernel" for op in entry.ops)
    leftovers = [op.opcode for op in entry.ops if op.opcode != "kernel" and op.opcode not in FREE_OPS]
    before = function_cost(lowered.program.module_before("recognize-attention").entry).bytes
    after = function_cost(entry).bytes
    return fn, (x, p), kernels, leftovers, before, after


def test_gpt2_block_fuses_and_matches() -> None:
    from quickstart import gpt2_block

    fn, args, kernels, leftovers, before, after = _gpt2_counts(True)
    print(f"GPT-2 block: {kernels} fusec kernels + {len(leftovers)} XLA ops {leftovers}; "
          f"bytes moved {after} vs {before} op by op ({after / before:.1%})")
    assert after / before < 0.40
    assert kernels + len(leftovers) <= 10
    assert_trees_close(fn(*args), jax.jit(gpt2_block)(*args), loose=True)


@pytest.mark.parametrize("arch", [80, 90])
def test_gpt2_block_kernels_compile_to_cubin_without_spills(arch: int) -> None:
    fn, args, kernels, *_ = _gpt2_counts(False)
    lowered = fn.lower(*args)
    resources = lowered.gpu_resources(arch)
    # QKV, attention, out projection, 2 layer norms (one kernel), 2 MLP matmuls
    assert kernels == 7 and len(resources) == len(lowered.program.distinct_kernels) == 6
    for r in resources:
        print(f"sm_{arch} {r.name}: {r.registers} registers, {r.spills} bytes spilled, {r.cubin_bytes} byte cubin")
        assert r.registers > 0 and r.cubin_bytes > 0
        assert r.spills == 0, r


@pytest.mark.parametrize("case", [c for c in CORPUS if not c.falls_back or c.name == "scatter_fallback"],
                         ids=lambda c: c.name)
def test_corpus_kernels_compile_to_cubin(case: Case) -> None:
    args = _args(case, "f32")
    fn = fusec.jit(case.fn, static_argnums=case.static_argnums, backend="pallas", interpret=False)
    lowered = fn.lower(*args)
    resources = lowered.gpu_resources(90)
    assert len(resources) == len(lowered.program.distinct_kernels)
    assert all(r.cubin_bytes > 0 for r in resources)


def _scan_model():
    def layer(x, p):
        h = jax.nn.gelu(x @ p["w1"] + p["b1"])
        y = h @ p["w2"] + x
        m = y.mean(-1, keepdims=True)
        v = ((y - m) ** 2).mean(-1, keepdims=True)
        return (y - m) * jax.lax.rsqrt(v + 1e-5) * p["g"]

    def model(x, stacked):
        return jax.lax.scan(lambda c, p: (layer(c, p), None), x, stacked)[0]

    rng = np.random.default_rng(3)
    n_layers, d, f = 4, 32, 64
    stacked = {"w1": jnp.asarray(rng.standard_normal((n_layers, d, f)) * 0.1, jnp.float32),
               "b1": jnp.asarray(rng.standard_normal((n_layers, f)) * 0.1, jnp.float32),
               "w2": jnp.asarray(rng.standard_normal((n_layers, f, d)) * 0.1, jnp.float32),
               "g": jnp.ones((n_layers, d), jnp.float32)}
    return model, (jnp.asarray(rng.standard_normal((8, d)), jnp.float32), stacked)


def test_scan_over_layers_is_fused_inside_the_body() -> None:
    model, args = _scan_model()
    fused = pallas(model)
    lowered = fused.lower(*args)
    module = lowered.program.module
    (scan,) = [op for op in module.entry.ops if op.opcode == "opaque"]
    body = module.function(scan.attr("bodies")[0])
    body_kernels = [op for op in body.ops if op.opcode == "kernel"]
    print(f"scan body: {len(body_kernels)} kernels: {[op.attr('kind') for op in body_kernels]}")
    assert [op.attr("kind") for op in body_kernels] == ["matmul", "matmul", "reduction"]
    assert "fusec_kernel" in str(jax.make_jaxpr(fused)(*args))
    assert_trees_close(fused(*args), jax.jit(model)(*args), loose=True)
    assert_trees_close(jax.grad(lambda *a: fused(*a).sum())(*args), jax.grad(lambda *a: model(*a).sum())(*args),
                       loose=True)


def test_while_and_cond_bodies_are_compiled() -> None:
    def fn(x, n):
        x = jax.lax.while_loop(lambda c: c[1] < n, lambda c: (jnp.tanh(c[0] * 1.5) + 0.1, c[1] + 1), (x, 0))[0]
        return jax.lax.cond(x.sum() > 0, lambda y: jax.nn.softmax(y, -1), lambda y: y * 2, x)

    x = jnp.linspace(-1, 1, 24).reshape(4, 6)
    fused = pallas(fn)
    module = fused.lower(x, 3).program.module
    bodies = [b for op in module.all_ops() if op.opcode == "opaque" for b in op.attr("bodies", ())]
    assert len(bodies) == 4  # while: cond and body; cond: two branches
    assert any(op.opcode == "kernel" for b in bodies for op in module.function(b).ops)
    assert_trees_close(fused(x, 3), jax.jit(fn)(x, 3), loose=True)


@pytest.mark.parametrize("heads,head_dim", [(2, 8), (3, 12), (4, 16)])
@pytest.mark.parametrize("interpret", [True, False])
def test_head_views_fold_into_index_maps(heads: int, head_dim: int, interpret: bool) -> None:
    d = heads * head_dim

    def attn(qkv):
        q, k, v = (t.reshape(10, heads, head_dim).transpose(1, 0, 2) for t in jnp.split(qkv, 3, axis=-1))
        p = jax.nn.softmax(jnp.einsum("hqd,hkd->hqk", q, k), axis=-1)
        return jnp.einsum("hqk,hkd->hqd", p, v).transpose(1, 0, 2).reshape(10, d)

    qkv = jnp.asarray(np.random.default_rng(4).standard_normal((10, 3 * d)), jnp.float32)
    fused = fusec.jit(attn, backend="pallas", interpret=interpret)
    entry = fused.lower(qkv).program.module.entry
    leftovers = [op.opcode for op in entry.ops if op.opcode != "kernel" and op.opcode not in FREE_OPS]
    # The attention kernel reads and writes heads that are whole blocks in place (from the fused
    # projection, into the model width); a 12-wide head is not a power of two.
    assert (leftovers == []) == (head_dim in (8, 16)), leftovers
    if interpret:
        assert_trees_close(fused(qkv), jax.jit(attn)(qkv), loose=True)
    else:
        jax.jit(fused).trace(qkv).lower(lowering_platforms=("cuda",))


def test_sibling_matmuls_share_one_kernel() -> None:
    case = next(c for c in CORPUS if c.name == "swiglu")
    args = _args(case, "f32")
    fused = pallas(case.fn)
    module = fused.lower(*args).program.module
    kernels = [op for op in module.entry.ops if op.opcode == "kernel"]
    # silu(x @ wg) * (x @ wu) is one kernel with two dots over shared x tiles; then the down projection.
    assert len(kernels) == 2
    first = module.function(str(kernels[0].attr("callee")))
    assert sum(op.opcode == "dot" for op in first.ops) == 2
    assert_trees_close(fused(*args), jax.jit(case.fn)(*args), loose=True)


@pytest.mark.parametrize("name", ["erf", "erfc"])
def test_erf_and_erfc_in_kernels_are_accurate(name: str) -> None:
    # Pallas's Triton lowering has no erf/erfc, so kernels compute them from elementary ops
    # (fusec/codegen/pallas_special.py); compared here with float64 math.erf/math.erfc.
    import math

    fn = {"erf": jax.lax.erf, "erfc": jax.lax.erfc}[name]
    exact = {"erf": math.erf, "erfc": math.erfc}[name]
    x = np.concatenate([np.linspace(-12, 12, 4001), [0.0, -0.0, 1e-30, -1e-30, 1e-8, 0.5, 3.9, 4.1, 9.0, 10.4, 10.6]])
    x = x.astype(np.float32).reshape(-1, 1)
    lowered = fusec.jit(lambda v: fn(v) * 1.0, backend="pallas", interpret=True).lower(x)
    assert name in [o.opcode for f in lowered.program.module.functions[1:] for o in f.ops]  # inside the kernel
    lowered.lower_for("cuda")
    got = np.asarray(fusec.jit(lambda v: fn(v) * 1.0, backend="pallas", interpret=True)(x), np.float64).ravel()
    truth = np.array([exact(float(v)) for v in x.ravel()])
    tiny = np.abs(truth) < 1e-37  # float32 cannot hold it; 0 or a denormal are both right
    rel = np.abs(got - truth)[~tiny] / np.maximum(np.abs(truth[~tiny]), 1e-30)
    assert rel.max() < (1e-6 if name == "erfc" else 2e-6), (rel.max(), x.ravel()[~tiny][rel.argmax()])
    assert np.all(np.abs(got[tiny]) < 1e-37)
    special = np.asarray(fusec.jit(fn, backend="pallas", interpret=True)(
        np.array([[np.inf], [-np.inf], [np.nan]], np.float32))).ravel()
    want = np.asarray(jax.jit(fn)(np.array([[np.inf], [-np.inf], [np.nan]], np.float32))).ravel()
    np.testing.assert_array_equal(special, want)


@pytest.mark.parametrize("precision,want", [(None, "inputPrecision = tf32"), ("HIGHEST", None)])
def test_f32_dot_precision_reaches_the_triton_dot(precision, want) -> None:
    """An f32 dot at HIGHEST stays IEEE float32 on the GPU (TTIR omits the default, IEEE); the
    default precision is TF32, as XLA's own GPU dots are (10-bit mantissa inputs: tests comparing
    GPU results against float32 need rtol around 1e-3)."""
    from fusec.runtime.jax_internals import triton_kernels_in

    prec = getattr(jax.lax.Precision, precision) if precision else None
    fn = fusec.jit(lambda x, w: jnp.tanh(jnp.dot(x, w, precision=prec)), backend="pallas", interpret=False)
    x, w = jnp.zeros((32, 64)), jnp.zeros((64, 32))
    (ttir, _), = triton_kernels_in(jax.jit(fn).trace(x, w).lower(lowering_platforms=("cuda",)))
    (dot,) = [line for line in ttir.splitlines() if "tt.dot" in line]
    assert (want in dot) if want else ("inputPrecision" not in dot), dot


def test_a_traceback_inside_a_kernel_shows_its_source_lines() -> None:
    import traceback

    f = fusec.jit(lambda x: (x << 2) + 1, backend="pallas", interpret=True)
    spec = next(iter(f.lower(jnp.ones((4, 8), jnp.int32)).program.kernels.values()))
    assert spec.tile_program.startswith("func @") and spec.source.startswith("# func @")
    with pytest.raises(Exception) as e:  # float input to an integer kernel: fails in the body
        spec.run(jnp.ones((4, 8), jnp.float32), interpret=True)
    text = "".join(traceback.format_exception(e.value))
    assert "<fusec kernel" in text and "lax.shift_left(" in text, text[-2000:]


def test_vmapped_kernels_lower_to_triton_kernels_for_cuda() -> None:
    from fusec.runtime.jax_internals import triton_kernels_in

    f = fusec.jit(lambda x: jnp.tanh(x) * 2.0, backend="pallas", interpret=True)
    x = jnp.ones((3, 5, 40))
    np.testing.assert_allclose(jax.vmap(f)(x), jnp.tanh(x) * 2.0, rtol=1e-6)
    lowered = jax.jit(jax.vmap(f)).trace(x).lower(lowering_platforms=("cuda",))
    assert triton_kernels_in(lowered)
