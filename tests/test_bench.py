"""The benchmark scripts run: the GPU suite in dry mode (tiny shapes, Pallas interpret mode), and the
CPU suite's pieces that CI does not otherwise reach (``python -m bench.cpu`` itself runs in .ci/run)."""

from __future__ import annotations

import math
import sys

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
    assert "decode int4 KV cache" in out and "decode int2 KV cache" in out
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


def test_gpu_session_stages_record_failures_and_time_limits(tmp_path) -> None:
    import time

    from bench import gpu_all

    py = sys.executable
    plan = [gpu_all.Stage("tests", (py, "-c", "print('===== 3 passed, 1 skipped in 0.5s =====')"), 30),
            gpu_all.Stage("edge-shapes:pallas", (py, "-c", "print('x'); raise SystemExit(1)"), 30),
            gpu_all.Stage("bench:pallas", (py, "-c", "import time; time.sleep(30)"), 6)]
    results = [gpu_all.run_stage(s, time.monotonic() + 60) for s in plan]
    assert [r.status for r in results] == ["ok", "failed (rc 1)", "timed out after 6 s"]
    assert results[0].summary == "3 passed, 1 skipped in 0.5s"
    # Past the session's budget a stage is skipped, not started.
    assert gpu_all.run_stage(plan[0], time.monotonic() + 1).status.startswith("skipped")
    md = gpu_all.markdown("test device", results, [])
    assert "| edge-shapes:pallas | failed (rc 1) |" in md


def test_gpu_session_plan_uses_the_sanitizer_only_on_a_gpu(tmp_path) -> None:
    from bench import gpu_all

    on_gpu = gpu_all.stages(tmp_path, False, ["pallas", "triton"], "/bin/compute-sanitizer")
    names = [s.name for s in on_gpu]
    assert names == ["tests", "sanitizer:pallas", "sanitizer:triton", "bench:pallas", "bench:triton", "autotune"]
    assert dict(on_gpu[-1].env)["FUSEC_AUTOTUNE_CACHE"] == str(tmp_path / "autotune.json")
    sanitized = on_gpu[1]
    assert sanitized.argv[0] == "/bin/compute-sanitizer"
    assert dict(sanitized.env)["XLA_PYTHON_CLIENT_ALLOCATOR"] == "platform"
    dry = [s.name for s in gpu_all.stages(tmp_path, True, ["pallas"], "/bin/compute-sanitizer")]
    assert dry == ["tests", "edge-shapes:pallas", "bench:pallas", "autotune"]
