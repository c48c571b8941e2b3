"""Passes: golden files (tests/golden/<pass>.fir), pipeline parsing, and semantic preservation
on random programs (the XLA backend runs each module before and after the pipeline)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusec.codegen.xla import module_to_callable
from fusec.ir import Builder, DType, Module, TensorType, parse_module, print_module
from fusec.passes import PASSES, PassManager, parse_pipeline
from fusec.pipeline import DEFAULT_PIPELINE, resolve_pipeline
from tests.helpers import golden_cases
from tests.ir_strategies import modules

GOLDEN = sorted((Path(__file__).parent / "golden").glob("*.fir"))


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.stem)
def test_golden(path: Path) -> None:
    for pipeline, given_text, expected_text in golden_cases(path):
        result = PassManager(parse_pipeline(pipeline)).run(parse_module(given_text, str(path)))
        assert print_module(result) == print_module(parse_module(expected_text, str(path)))


def test_every_pass_has_a_golden_file() -> None:
    assert {p.stem for p in GOLDEN} >= set(PASSES)


def test_pipeline_parsing() -> None:
    passes = parse_pipeline("inline, cse,dce")
    assert [p.name for p in passes] == ["inline", "cse", "dce"]
    assert [p.name for p in resolve_pipeline(None)] == list(DEFAULT_PIPELINE)
    assert [p.name for p in parse_pipeline(["dce", "cse,inline"])] == ["dce", "cse", "inline"]
    assert parse_pipeline("") == []
    with pytest.raises(ValueError, match="unknown pass 'nope'"):
        parse_pipeline("cse,nope")
    with pytest.raises(ValueError, match="pass 'cse' has no option 'depth'"):
        parse_pipeline("cse{depth=2}")
    with pytest.raises(ValueError, match="bad pass pipeline"):
        parse_pipeline("cse;;")


def test_manager_records_and_reports_stages() -> None:
    seen: list[str] = []
    module = parse_module(GOLDEN[0].read_text().split("// EXPECT:")[0])
    manager = PassManager(parse_pipeline("cse,dce"), on_stage=lambda name, m: seen.append(name))
    manager.run(module)
    assert seen == ["input", "cse", "dce"] == [name for name, _ in manager.stages]


def _run(module: Module, args: list[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.jit(module_to_callable(module))(*args)]


@settings(max_examples=40)
@given(modules(executable=True))
def test_default_pipeline_preserves_semantics(module: Module) -> None:
    rng = np.random.default_rng(0)
    args = []
    for p in module.entry.params:
        dt = np.dtype(p.type.elem.numpy_name)
        data = rng.standard_normal(p.type.shape) * 3
        args.append(data.astype(dt) if dt.kind != "b" else data > 0)
    optimized = PassManager(resolve_pipeline(None)).run(module)
    for got, want in zip(_run(optimized, args), _run(module, args)):
        np.testing.assert_array_equal(got, want)


@st.composite
def _row_programs(draw) -> Module:
    """x [a, b, k] -> reshape -> dot -> reshape [a, b, n], then a random chain of elementwise ops
    (with bias broadcasts, splat constants and other [a, b, n] inputs) and last-axis reductions
    broadcast back: the shapes sink-reshapes rewrites."""
    a, b, k, n = (draw(st.integers(1, 4)) for _ in range(4))
    bld = Builder()
    x, w = bld.param(TensorType(DType("f32"), (a, b, k)), "x"), bld.param(TensorType(DType("f32"), (k, n)), "w")
    bias, other = bld.param(TensorType(DType("f32"), (n,)), "bias"), bld.param(TensorType(DType("f32"), (a, b, n)), "r")
    flat = bld.op("reshape", [x], shape=(a * b, k))
    cur = bld.op("reshape", [bld.op("dot", [flat, w], lhs_t=False, rhs_t=False, out_dtype="f32")], shape=(a, b, n))
    outs = [cur]
    for step in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["bias", "const", "other", "unary", "rowmax", "self"]))
        if kind == "bias":
            cur = bld.op("add", [cur, bld.op("broadcast", [bias], dims=(2,), shape=(a, b, n))])
        elif kind == "const":
            cur = bld.op("mul", [cur, bld.op("constant", value=0.5 + step, dtype="f32", shape=(a, b, n))])
        elif kind == "other":
            cur = bld.op("sub", [other, cur])
        elif kind == "unary":
            cur = bld.op(draw(st.sampled_from(["tanh", "exp", "neg", "abs"])), [cur])
        elif kind == "self":
            cur = bld.op("max", [cur, outs[draw(st.integers(0, len(outs) - 1))]])
        else:
            row = bld.op("reduce", [cur], kind="max", axes=(2,))
            cur = bld.op("sub", [cur, bld.op("broadcast", [row], dims=(0, 1), shape=(a, b, n))])
        outs.append(cur)
    picked = draw(st.lists(st.sampled_from(outs), min_size=1, max_size=3, unique_by=lambda v: v.name))
    return Module((bld.finish([*picked, cur]),))


@settings(max_examples=40)
@given(_row_programs())
def test_sink_reshapes_preserves_semantics(module: Module) -> None:
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(p.type.shape).astype(np.float32) for p in module.entry.params]
    rewritten = PassManager(parse_pipeline("sink-reshapes,cse,dce")).run(module)
    assert parse_module(print_module(rewritten)) == rewritten
    for got, want in zip(_run(rewritten, args), _run(module, args)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # The elementwise work now runs on the dot's [M, N] rows.
    assert not any(op.opcode in ("add", "mul", "sub", "tanh", "exp", "neg", "abs", "max") and op.result.type.rank == 3
                   for op in rewritten.entry.ops)
