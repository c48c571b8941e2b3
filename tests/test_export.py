"""jax.export of fusec programs: for cpu and for cuda (from a CPU machine), serialised and read back."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import fusec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from quickstart import example_inputs, gpt2_block  # noqa: E402

pytest.importorskip("flatbuffers", reason="jax.export serialisation needs the flatbuffers package")


def _custom_calls(exported: jax.export.Exported) -> list[str]:
    return re.findall(r"custom_call @([\w$.]+)", exported.mlir_module())


@pytest.fixture(scope="module")
def block() -> tuple[fusec.FusecFunction, tuple]:
    return fusec.jit(gpt2_block, backend="pallas"), example_inputs()


def test_export_for_cpu_round_trips_and_matches_jax(block) -> None:
    fn, args = block
    exported = jax.export.export(jax.jit(fn), platforms=("cpu",))(*args)
    assert _custom_calls(exported) == []  # interpret-mode kernels are plain HLO
    back = jax.export.deserialize(exported.serialize())
    np.testing.assert_allclose(back.call(*args), jax.jit(gpt2_block)(*args), rtol=2e-5, atol=2e-5)


def test_export_for_cuda_holds_the_triton_kernels(block) -> None:
    fn, args = block
    kernels = len(fn.lower(*args).program.distinct_kernels)  # the two layer norms are one kernel
    with pytest.raises(ValueError, match="no compatibility guarantees"):
        jax.export.export(jax.jit(fn), platforms=("cuda",))(*args)
    exported = jax.export.export(jax.jit(fn), platforms=("cuda",),
                                 disabled_checks=fusec.export_disabled_checks())(*args)
    assert _custom_calls(exported) == list(fusec.GPU_CUSTOM_CALLS) * kernels
    back = jax.export.deserialize(exported.serialize())
    assert back.platforms == ("cuda",) and back.in_avals == exported.in_avals


def test_one_export_for_cpu_and_cuda_runs_on_cpu(block) -> None:
    fn, args = block
    exported = jax.export.export(jax.jit(fn), platforms=("cpu", "cuda"),
                                 disabled_checks=fusec.export_disabled_checks())(*args)
    back = jax.export.deserialize(exported.serialize())
    np.testing.assert_allclose(back.call(*args), jax.jit(gpt2_block)(*args), rtol=2e-5, atol=2e-5)


def test_the_readme_export_example_runs() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = readme.split("## Export", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md#export", "exec"), namespace)
    np.testing.assert_allclose(namespace["out"], jax.jit(gpt2_block)(*example_inputs()), rtol=2e-5, atol=2e-5)
