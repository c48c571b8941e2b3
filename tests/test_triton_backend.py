"""The Triton backend on a CPU: its generated kernels run in the Triton interpreter (on NumPy arrays,
no torch, no GPU) against jax.jit, on the corpus, random programs and the low-bit matmul matrix;
its GPU-tiled kernels run there too with every element each access reaches checked against the
arrays' bounds; jit, vmap and grad go through its kernels.

A longer random-program run:
    FUSEC_TRITON_DIFF_EXAMPLES=1000 pytest tests/test_triton_backend.py -k random
"""

from __future__ import annotations

import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fusec
from fusec import lowprec
from fusec.codegen.triton import interpret as triton_interpret
from fusec.codegen.triton.interpret import OutOfBounds, numpy_dtype, run_interpreted
from fusec.codegen.triton.kernel import ArraySig, TritonKernel
from tests.corpus import CORPUS, Case
from tests.helpers import assert_trees_close
from tests.test_differential import _run, programs
from tests.test_lowprec import _spec

SMOKE = ("test_corpus_matches_jax_jit", "test_lowbit_matmul_matches_the_reference_decoder",
         "test_gpu_kernels_stay_inside_their_arrays", "test_jit_vmap_grad_through_a_triton_kernel",
         "test_random_programs_match_jax_jit")

@pytest.fixture(autouse=True, scope="module")
def _triton_dirs(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Nothing Triton writes (caches, generated modules) goes to the home directory.
    root = tmp_path_factory.mktemp("triton")
    for key in ("TRITON_HOME", "TRITON_CACHE_DIR"):
        os.environ.setdefault(key, str(root / key.lower()))


def _args(case: Case, dtype) -> tuple:
    return case.make_args(dtype, np.random.default_rng(sum(map(ord, case.name))))


def _triton(fn, interpret: bool = True, **kw):
    return fusec.jit(fn, backend="triton", interpret=interpret, **kw)


def _all_triton(lowered) -> None:
    backends = {name: spec.backend for name, spec in lowered.program.kernels.items()}
    assert set(backends.values()) <= {"triton"}, backends


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.name)
def test_corpus_matches_jax_jit(case: Case) -> None:
    args = _args(case, jnp.float32)
    fn = _triton(case.fn, static_argnums=case.static_argnums)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no kernel falls back to Pallas
        got = fn(*args)
    assert_trees_close(got, jax.jit(case.fn, static_argnums=case.static_argnums)(*args), loose=True)
    _all_triton(fn.lower(*args))


BF16_CASES = ["mlp", "layernorm", "softmax", "attention_causal", "iota_arange", "math_functions", "convert_dtypes",
              "reductions", "gelu_exact", "pow_int_exponent"]


@pytest.mark.parametrize("name", BF16_CASES)
def test_corpus_bfloat16_matches_jax_jit(name: str) -> None:
    case = next(c for c in CORPUS if c.name == name)
    args = _args(case, jnp.bfloat16)
    got = _triton(case.fn, static_argnums=case.static_argnums)(*args)
    assert_trees_close(got, jax.jit(case.fn, static_argnums=case.static_argnums)(*args), loose=True)


@pytest.mark.parametrize("name", ["mlp", "softmax", "attention_causal", "einsum_batched_matmul", "reductions"])
def test_gpu_tiled_corpus_runs_in_the_interpreter(name: str) -> None:
    # interpret=False tiles for a GPU; on a CPU those kernels still run, in the interpreter.
    case = next(c for c in CORPUS if c.name == name)
    args = _args(case, jnp.float32)
    fn = _triton(case.fn, interpret=False)
    assert_trees_close(fn(*args), jax.jit(case.fn)(*args), loose=True)
    assert all(not spec.interpret for spec in fn.lower(*args).program.kernels.values())


@settings(max_examples=int(os.environ.get("FUSEC_TRITON_DIFF_EXAMPLES", "100")), deadline=None)
@given(programs(), st.sampled_from([jnp.float32, jnp.bfloat16]), st.booleans())
def test_random_programs_match_jax_jit(program, dtype, gpu_tiles: bool) -> None:
    rng = np.random.default_rng(len(program[1]))
    args = [jnp.asarray(rng.standard_normal(s) * 0.5, dtype) for s in program[0]]
    fn = lambda *a: _run(program, a)  # noqa: E731
    saved, triton_interpret.CHECK_BOUNDS = triton_interpret.CHECK_BOUNDS, True  # GPU tiles overhang: masks must hold
    try:
        got = _triton(fn, interpret=not gpu_tiles)(*args)
    finally:
        triton_interpret.CHECK_BOUNDS = saved
    want = jax.jit(fn)(*args)
    if dtype == jnp.bfloat16:  # as tests/test_differential.py: an ulp of the intermediate's magnitude
        for g, w in zip(got, want):
            w64 = np.asarray(w, np.float64)
            scale = max(1.0, float(np.max(np.abs(w64), initial=0.0)))
            np.testing.assert_allclose(np.asarray(g, np.float64), w64, rtol=2e-2, atol=2e-2 * scale)
    else:
        assert_trees_close(got, want, loose=True)


# (family, bits, group, m, k, n): every family, M in 1, 3, 17, shapes that divide no block.
LOWBIT = [("int", 4, 64, 1, 128, 37), ("int", 3, 128, 3, 256, 50), ("int", 8, 32, 17, 64, 16),
          ("uint", 5, 64, 17, 128, 70), ("uint", 2, None, 1, 101, 9), ("fp", 4, 64, 1, 128, 30),
          ("fp", 8, None, 3, 101, 20), ("fp", 6, 32, 17, 96, 33), ("nf", 4, 32, 17, 64, 33),
          ("nf", 3, 64, 1, 192, 45), ("lut", 3, 32, 1, 96, 9), ("lut", 8, 128, 3, 256, 19)]


def _check_lowbit(family: str, bits: int, group: int | None, m: int, k: int, n: int, interpret: bool) -> None:
    rng = np.random.default_rng(bits * 1000 + m + k + n)
    params = {"w": jnp.asarray(rng.standard_normal((k, n)) * 0.1, jnp.float32),
              "b": jnp.asarray(rng.standard_normal(n), jnp.float32)}
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    q = lowprec.quantize(params, _spec(family, bits, group), where=lambda p, leaf: p.endswith("['w']"))
    model = lambda p, x: jnp.tanh(x @ p["w"] + p["b"])  # noqa: E731
    fused = _triton(model, interpret=interpret)
    lowered = fused.lower(q, x)
    _all_triton(lowered)
    assert not any(op.opcode == "dequantize" for op in lowered.program.module.entry.ops), "dequantize not fused"
    want = jax.jit(model)(lowprec.dequantize(q), x)
    np.testing.assert_allclose(np.asarray(fused(q, x)), np.asarray(want), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("fmt", LOWBIT, ids=lambda f: f"{f[0]}{f[1]}g{f[2]}-m{f[3]}")
def test_lowbit_matmul_matches_the_reference_decoder(fmt) -> None:
    _check_lowbit(*fmt, interpret=True)


@pytest.mark.parametrize("fmt", LOWBIT[::3], ids=lambda f: f"{f[0]}{f[1]}g{f[2]}-m{f[3]}")
def test_gpu_tiled_lowbit_matmul_matches(fmt) -> None:
    # GPU tiles: split-K programs adding into zeroed outputs, K steps up to the scale group.
    _check_lowbit(*fmt, interpret=False)


@pytest.mark.slow
@pytest.mark.parametrize("family,bits", [(f, b) for f in ("int", "uint", "nf", "lut") for b in range(2, 9)]
                         + [("fp", 4), ("fp", 6), ("fp", 8)])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_lowbit_matrix(family: str, bits: int, m: int) -> None:
    for group, k, n in ((32, 128, 37), (128, 256, 100), (None, 229, 20)):
        for interpret in (True, False):
            _check_lowbit(family, bits, group, m, k, n, interpret)


def test_jit_vmap_grad_through_a_triton_kernel() -> None:
    def f(x, w, b):
        return jnp.sum(jax.nn.gelu(x @ w + b) ** 2)

    rng = np.random.default_rng(0)
    x, w, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((5, 33), (33, 19), (19,)))
    fused = _triton(jax.nn.softmax)
    _all_triton(fused.lower(x))
    np.testing.assert_allclose(jax.jit(fused)(x), jax.nn.softmax(x), rtol=2e-5, atol=2e-6)
    batched = jnp.stack([x, 2 * x])
    np.testing.assert_allclose(jax.vmap(fused)(batched), jax.vmap(jax.nn.softmax)(batched), rtol=2e-5, atol=2e-6)
    got = jax.grad(_triton(f), argnums=(0, 1, 2))(x, w, b)
    assert_trees_close(got, jax.grad(f, argnums=(0, 1, 2))(x, w, b), loose=True)


def _bounded_cases() -> list[tuple[str, object, tuple]]:
    rng = np.random.default_rng(1)
    n = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    q = lowprec.quantize({"w": n(229, 37)}, lowprec.QuantSpec(4, None))
    return [("gemv_m1", lambda x, w: jax.nn.relu(x @ w), (n(1, 1001), n(1001, 35))),
            ("gemm_m3", lambda x, w, b: x @ w + b, (n(3, 77), n(77, 130), n(130))),
            ("layernorm_1000", lambda x: (x - x.mean(-1, keepdims=True)) / (x.std(-1, keepdims=True) + 1e-5),
             (n(5, 1000),)),
            ("softmax_odd", jax.nn.softmax, (n(7, 45),)),
            ("lowbit_gemv", lambda p, x: x @ p["w"], (q, n(3, 229)))]


@pytest.mark.parametrize("name,fn,args", _bounded_cases(), ids=lambda c: c if isinstance(c, str) else "")
def test_gpu_kernels_stay_inside_their_arrays(name: str, fn, args) -> None:
    """Every GPU-tiled kernel, run in the interpreter on random arrays, reaches only elements of its
    own arrays (each between guard regions) with every access's mask applied; and the generated
    source masks each access to an array some block overhangs."""
    lowered = _triton(fn).lower(*args)
    rng = np.random.default_rng(2)
    checked = 0
    for spec in {id(s): s for s in lowered.program.kernels.values()}.values():
        gpu = spec.for_gpu()
        assert gpu is not None and gpu.backend == "triton"
        kernel = gpu.backend_kernel
        arrays = [_random(sig, rng) for sig in kernel.inputs]
        run_interpreted(kernel, *arrays, check_bounds=True)
        _check_source_masks(kernel)
        checked += 1
    assert checked >= 1


def _random(sig: ArraySig, rng: np.random.Generator) -> np.ndarray:
    dtype = numpy_dtype(sig.dtype)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 2**31, sig.shape).astype(dtype)
    return rng.standard_normal(sig.shape).astype(dtype)


def _check_source_masks(kernel: TritonKernel) -> None:
    """Each ``tl.load``/``tl.store``/``tl.atomic_add`` whose offsets along a dimension (``start +
    tl.arange(0, block)``) can pass the array's size carries a mask on that dimension."""
    arrays = [*kernel.inputs, *kernel.outputs]
    # The kernel's own header (helpers such as _fusec_dot_operand may come first).
    header = re.search(rf"def {kernel.name}\((.*)\):", kernel.source).group(1)
    params = [p.strip() for p in header.split(",")]
    lines = kernel.source.splitlines()
    for i, line in enumerate(lines):
        access = re.search(r"tl\.(load|store|atomic_add)\((p_\w+) \+ (.*)", line)
        if not access:
            continue
        sig = arrays[params.index(access.group(2))]
        pointer = access.group(3).split(", ")[0]
        for name, d in set(re.findall(r"\b(\w+_o(\d+)(?:_\d+)?)\b", pointer)):
            definition = next((x for x in reversed(lines[:i]) if re.match(rf"\s*{name} = ", x)), None)
            if definition is None or "tl.arange" not in definition:
                continue
            d = int(d)
            block = int(re.search(r"tl\.arange\(0, (\d+)\)", definition).group(1))
            # A constant start (0) overhangs when the block is longer than the dimension; any other
            # start is a program or loop index, whose last block overhangs unless the block divides it.
            constant = re.match(rf"\s*{name} = tl\.arange", definition) is not None
            overhangs = block > sig.shape[d] if constant else sig.shape[d] % block != 0
            if overhangs:
                assert f"{name}" in line.split("mask=")[-1] and "mask=" in line, \
                    f"kernel {kernel.name}: unmasked overhanging {access.group(1)} of {access.group(2)}: {line}"


def test_the_bounds_check_catches_an_unmasked_overhang() -> None:
    source = ("import triton\nimport triton.language as tl\n\n\n@triton.jit\ndef k_over(p_in0, p_out0):\n"
              "    o = tl.arange(0, 8)\n    tl.store(p_out0 + o, tl.load(p_in0 + o, mask=o < 5, other=0.0))\n")
    kernel = TritonKernel("k_over", source, (1,), (ArraySig((5,), "float32"),), (ArraySig((5,), "float32"),))
    with pytest.raises(OutOfBounds, match="store reaches 3 element"):
        run_interpreted(kernel, np.ones(5, np.float32), check_bounds=True)
    with pytest.raises(AssertionError, match="unmasked overhanging store"):
        _check_source_masks(TritonKernel("k_over", source.replace("o = tl.arange", "p_out0_o0 = tl.arange").replace(
            "p_out0 + o,", "p_out0 + p_out0_o0,"), (1,), kernel.inputs, kernel.outputs))


def test_a_kernel_triton_cannot_express_falls_back_to_pallas_visibly() -> None:
    f = lambda x, y: jnp.nextafter(x, y) * 2  # noqa: E731  (16-bit nextafter: no Triton form here)
    x, y = jnp.linspace(-1, 1, 12, dtype=jnp.bfloat16), jnp.zeros(12, jnp.bfloat16)
    fused = _triton(f)
    with pytest.warns(UserWarning, match="runs as a Pallas kernel"):
        lowered = fused.lower(x, y)
    spec = next(iter(lowered.program.kernels.values()))
    assert spec.backend == "pallas" and "Triton backend cannot express" in spec.source
    np.testing.assert_array_equal(np.asarray(fused(x, y), np.float32), np.asarray(jax.jit(f)(x, y), np.float32))


def test_libdevice_functions_exist_on_both_sides() -> None:
    from triton.language.extra import libdevice

    from fusec.codegen.triton import body
    from fusec.codegen.triton.interpret_math import LIBDEVICE

    for name in [*body._LIBDEVICE.values(), "fmod"]:
        assert hasattr(libdevice, name) and hasattr(LIBDEVICE, name), name


def test_backend_is_listed_and_keeps_source() -> None:
    from fusec.codegen import backend_names

    assert "triton" in backend_names()
    x = jnp.ones((3, 5))
    lowered = _triton(lambda x: jnp.exp(x) + 1).lower(x)
    (source,) = lowered.kernel_sources.values()
    assert "@triton.jit" in source and "tl.program_id" in source and "# func @" in source


_MANGLE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int8": "i8", "int16": "i16", "int32": "i32",
           "uint8": "u8", "uint16": "u16", "uint32": "u32", "bool": "i1"}


def _compile(kernel: TritonKernel, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fusec.codegen.triton.load import jit_function

    fn = jit_function(kernel, interpret=False)
    signature = {name: "*" + _MANGLE[sig.dtype] for name, sig in zip(fn.arg_names, [*kernel.inputs, *kernel.outputs])}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs={}), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": kernel.num_warps, "num_stages": kernel.num_stages})


def test_gpu_kernels_compile_for_sm80_and_sm90_after_interpreting() -> None:
    # The interpreter and GPU compilation in one process: running kernels in the interpreter first
    # leaves the GPU functions (modules of their own) compiling as usual.
    rng = np.random.default_rng(3)
    x, w = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((3, 77), (77, 40)))
    q = lowprec.quantize({"w": w}, lowprec.QuantSpec(4, None))
    cases = [(lambda x, w: jax.nn.gelu(x @ w), (x, w)), (lambda p, x: x @ p["w"], (q, x)), (jax.nn.softmax, (x,))]
    compiled = 0
    for fn, args in cases:
        fused = _triton(fn, interpret=False)
        fused(*args)  # GPU tiles, in the interpreter
        for spec in fused.lower(*args).program.kernels.values():
            for arch in (80, 90):
                assert "cubin" in _compile(spec.backend_kernel, arch).asm
                compiled += 1
    assert compiled >= 6


def test_every_elementwise_op_of_the_target_has_an_emitter() -> None:
    from fusec.codegen.triton.body import EMITTERS
    from fusec.passes.target import TRITON

    assert not TRITON.elementwise - set(EMITTERS)


def test_special_functions_match_jax_jit() -> None:
    def f(x, y, n):
        u = jnp.tanh(x) * 0.9  # in (-1, 1)
        return (jnp.tan(u), jnp.arcsin(u), jnp.arccos(u), jnp.arctan(x), jnp.sinh(x), jnp.cosh(x), jnp.arcsinh(x),
                jnp.arccosh(jnp.abs(x) + 1), jnp.arctanh(u), jnp.cbrt(x), jax.scipy.special.erfc(x),
                jax.scipy.special.erfinv(u), jnp.expm1(x), jnp.log1p(jnp.abs(x)), jnp.arctan2(x, y),
                jnp.fmod(x, y + 3), jnp.power(jnp.abs(x) + 0.5, y), jnp.sign(x), jnp.floor(x), jnp.ceil(x),
                jnp.isfinite(x / (y - y)), jnp.nextafter(x, y), jnp.clip(x, -0.5, 0.5), x ** 3, x ** -2,
                jnp.maximum(x, jnp.nan * (y > 1)), n >> 2, jax.lax.shift_right_logical(n, 3), n << 3, n % 7, n // 3)

    rng = np.random.default_rng(4)
    x, y = (jnp.asarray(rng.standard_normal((8, 16)), jnp.float32) for _ in range(2))
    n = jnp.asarray(rng.integers(-1000, 1000, (8, 16)), jnp.int32)
    fused = _triton(f)
    _all_triton(fused.lower(x, y, n))
    assert_trees_close(fused(x, y, n), jax.jit(f)(x, y, n), loose=True)


def _examples() -> list:
    from tests.test_examples import EXAMPLES

    return [pytest.param(p, id=p.stem, marks=[] if p.stem == "quickstart" else [pytest.mark.slow]) for p in EXAMPLES]


@pytest.mark.parametrize("path", _examples())
def test_examples_run_on_the_triton_backend(path) -> None:
    # Flax NNX and Linen, Equinox, Haiku and plain-JAX models, unchanged (the default run takes one).
    from tests.test_examples import example_args, load_example

    module = load_example(path)
    args = example_args(module)
    fn = getattr(module, module.EXAMPLE_FUNCTION)
    fused = _triton(fn)
    assert_trees_close(fused(*args), jax.jit(fn)(*args), loose=True)
    _all_triton(fused.lower(*args))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mlp", "layernorm", "softmax", "attention_causal", "swiglu", "reductions"])
def test_gpu_runs_match_jax_jit(name: str) -> None:
    from fusec.runtime.triton_call import triton_backend_problem
    from tests.helpers import GPU_TF32_TOLERANCES

    if triton_backend_problem():
        pytest.skip(triton_backend_problem())
    case = next(c for c in CORPUS if c.name == name)
    for dtype in (jnp.float32, jnp.bfloat16):
        args = _args(case, dtype)
        got, want = _triton(case.fn, interpret=False)(*args), jax.jit(case.fn)(*args)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64),
                                       **GPU_TF32_TOLERANCES[np.dtype(w.dtype).name])


def test_cli_prints_triton_source(capsys) -> None:
    from pathlib import Path

    from fusec.cli import main

    target = str(Path(__file__).resolve().parent.parent / "examples" / "quickstart.py") + ":layer_norm"
    assert main(["source", target, "--backend", "triton", "--interpret",
                 "--args", "x=f32[6,768] scale=f32[768] bias=f32[768]"]) == 0
    out = capsys.readouterr().out
    assert "@triton.jit" in out and "mask=" in out and "tl.load" in out


@pytest.mark.parametrize("bits,group,m", [(4, 128, 1), (2, 128, 5), (4, 64, 16), (3, 128, 3)])
def test_paired_gemv_on_gpu_tiles(bits: int, group: int, m: int) -> None:
    """The paired GEMV (unpack_pair, pick_lanes: two bfloat16 weights per 32-bit decode) written as
    Triton, run on its GPU tiles in the interpreter: within one bfloat16 ulp of the exact product,
    inside its arrays, and compiling for sm_90."""
    import dataclasses

    from tests.test_gemv_pairs import GPU_TILES_INTERPRETED, _weight

    q = _weight(bits, group, 640, 200, seed=bits * m)
    x = jnp.asarray(np.random.default_rng(m).standard_normal((m, 640)), jnp.bfloat16)
    fused = _triton(lambda q, x: x @ q, passes=GPU_TILES_INTERPRETED)
    lowered = fused.lower(q, x)
    _all_triton(lowered)
    assert "gemv-pairs" in [op.attr("strategy") for op in lowered.program.module.entry.ops if op.opcode == "kernel"]
    got = np.asarray(fused(q, x).astype(jnp.float32), np.float64)
    exact = np.asarray(x, np.float64) @ np.asarray(dataclasses.replace(q, dtype=jnp.dtype("float32")).dequantize(),
                                                   np.float64)
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(exact), 1e-30))) - 7)
    assert np.all(np.abs(got - exact) <= ulp + 1e-4)
    rng = np.random.default_rng(5)
    for spec in lowered.program.kernels.values():
        run_interpreted(spec.backend_kernel, *[_random(sig, rng) for sig in spec.backend_kernel.inputs],
                        check_bounds=True)
    assert "cubin" in _compile(next(iter(lowered.program.kernels.values())).backend_kernel, 90).asm


@pytest.mark.parametrize("name", ["mlp", "layernorm", "softmax", "attention_causal", "rotary_embedding"])
def test_lowering_for_cuda_calls_jax_triton(name: str) -> None:
    from fusec.runtime.jax_internals import gpu_lowering_target
    from fusec.runtime.triton_call import triton_backend_problem

    if triton_backend_problem():
        pytest.skip(triton_backend_problem())
    case = next(c for c in CORPUS if c.name == name)
    args = _args(case, jnp.float32)
    fused = _triton(case.fn, static_argnums=case.static_argnums)
    kernels = {id(s) for s in fused.lower(*args).program.kernels.values()}
    with gpu_lowering_target("cuda"):
        text = jax.jit(fused, static_argnums=case.static_argnums).trace(*args).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("triton_kernel_call") >= len(kernels) >= 1
    assert "__gpu$xla.gpu.triton" not in text  # no kernel fell back to Pallas
