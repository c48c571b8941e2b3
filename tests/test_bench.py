"""The benchmark scripts run: the GPU suite in dry mode (tiny shapes, Pallas interpret mode), and the
CPU suite's pieces that CI does not otherwise reach (``python -m bench.cpu`` itself runs in .ci/run)."""

from __future__ import annotations

import math

import pytest

from bench import cpu, first_call, gpu

# The dry run takes a minute; the smoke subset takes the quick tests.
SMOKE = ("test_gpu_suite_refuses_to_run_full_without_a_gpu", "test_scaling_fit_and_cost_rows")


def test_gpu_suite_dry_run_prints_every_row_group(capsys) -> None:
    assert gpu.main(["--dry"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# fusec GPU suite on ") and "dry run" in out
    for group in ("low-bit matmul", "model block", "norm", "attention", "compile"):
        assert group in out
    for fmt in gpu.FORMATS:
        assert f"\nlow-bit matmul  {fmt} " in out
    assert "failed" not in out  # every baseline, JAX's Pallas ops included, ran
    errors = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("low-bit matmul")]
    assert errors and max(errors) < 2e-2  # fusec's low-bit products agree with XLA's (bf16 output)
    rows = [line for line in out.splitlines() if line.startswith(("low-bit", "model block", "norm", "compile"))]
    assert len(rows) == 2 * 2 * len(gpu.FORMATS) + 4 + 6 + 1


def test_gpu_suite_refuses_to_run_full_without_a_gpu(capsys) -> None:
    assert gpu.main([]) == 2
    assert "needs a GPU" in capsys.readouterr().err


def test_scaling_fit_and_cost_rows() -> None:
    assert math.isclose(cpu.fit_exponent([1, 2, 4, 8], [3.0, 6.0, 12.0, 24.0]), 1.0)
    assert math.isclose(cpu.fit_exponent([1, 2, 4], [1.0, 4.0, 16.0]), 2.0)
    rows = {r["model"]: r for r in cpu.cost_rows()}
    assert set(rows) == {"gpt2", "llama"}
    for r in rows.values():
        assert 0 < r["bytes fused"] < r["bytes op-by-op"] and r["kernels"] > 0 and r["XLA bytes accessed"] > 0


def test_first_call_worker_splits_the_time() -> None:
    fusec_run = first_call.worker("gpt2", "fusec")
    stages = ("trace", "frontend", "passes", "codegen", "emit", "lower", "compile", "first run")
    assert all(fusec_run[k] >= 0 for k in stages)
    assert fusec_run["total"] == pytest.approx(sum(fusec_run[k] for k in stages))
    assert fusec_run["kernels"] > fusec_run["distinct"] > 0  # repeated kernels are lowered once
    jax_run = first_call.worker("gpt2", "jax")
    assert set(jax_run) >= {"trace", "lower", "compile", "total"} and "kernels" not in jax_run
