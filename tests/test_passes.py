"""Passes: golden files (tests/golden/<pass>.fir), pipeline parsing, and semantic preservation
on random programs (the XLA backend runs each module before and after the pipeline)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import given, settings

from fusec.codegen.xla import module_to_callable
from fusec.ir import Module, parse_module, print_module
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
