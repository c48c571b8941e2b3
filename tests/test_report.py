"""fusec.inspect: the roofline model on hand-computed cases, the report's numbers, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import fusec
from fusec.cli import main
from fusec.roofline import GPUS, LAUNCH_OVERHEAD_S, modeled_time

BF16_4096 = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
QUICKSTART = str(Path(__file__).resolve().parent.parent / "examples" / "quickstart.py")


def test_roofline_elementwise_add_on_h100() -> None:
    # Two 4096x4096 bf16 inputs read, one written: 3 * 4096^2 * 2 bytes at 3.35 TB/s.
    bytes_moved = 3 * 4096 * 4096 * 2
    assert bytes_moved == 100_663_296
    expected = bytes_moved / 3.35e12 + LAUNCH_OVERHEAD_S  # 30.05 us + 3 us; the 16.8 MFLOP are negligible
    assert modeled_time(GPUS["h100"], bytes_moved, 4096 * 4096, "bf16") == pytest.approx(expected)
    report = fusec.inspect(lambda a, b: a + b, BF16_4096, BF16_4096, gpu="h100", backend="pallas", interpret=True)
    (kernel,) = report.kernels
    assert kernel.bytes_read + kernel.bytes_written == bytes_moved
    assert kernel.modeled_time_s == pytest.approx(expected)
    assert kernel.modeled_time_s * 1e6 == pytest.approx(33.05, abs=0.01)


def test_roofline_matmul_on_h100() -> None:
    # 2 * 4096^3 FLOPs at 989 TFLOP/s (bf16 dense) outweigh 100.7 MB at 3.35 TB/s.
    flops = 2 * 4096**3
    expected = flops / 989e12 + LAUNCH_OVERHEAD_S
    report = fusec.inspect(lambda a, b: a @ b, BF16_4096, BF16_4096, gpu="h100", backend="pallas", interpret=True)
    (kernel,) = report.kernels
    assert kernel.flops == flops and kernel.bytes_read + kernel.bytes_written == 3 * 4096 * 4096 * 2
    assert kernel.modeled_time_s == pytest.approx(expected)
    assert kernel.modeled_time_s * 1e6 == pytest.approx(141.97, abs=0.01)
    assert kernel.arithmetic_intensity == pytest.approx(flops / (3 * 4096 * 4096 * 2))


@pytest.fixture
def quickstart():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quickstart", QUICKSTART)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_json_matches_the_kernels(quickstart) -> None:
    fn = fusec.jit(quickstart.gpt2_block, backend="pallas", interpret=True)
    args = quickstart.example_inputs()
    report = fn.inspect(*args, gpu="a100")
    data = json.loads(report.to_json())
    assert data["version"] == 1 and data["gpu"] == "NVIDIA A100 SXM 80GB"
    kernel_ops = [op for op in fn.lower(*args).program.module.entry.ops if op.opcode == "kernel"]
    assert [k["name"] for k in data["kernels"]] == [str(op.attr("callee")) for op in kernel_ops]
    for k, op in zip(data["kernels"], kernel_ops):
        assert (k["bytes_read"], k["bytes_written"], k["flops"]) == (op.attr("bytes_read"), op.attr("bytes_written"),
                                                                      op.attr("flops"))
        assert "pl.pallas_call(" in k["source"]
    assert data["bytes_fused"] == sum(k["bytes_read"] + k["bytes_written"] for k in data["kernels"])
    assert data["bytes_fused"] < 0.4 * data["bytes_op_by_op"]
    assert data["modeled_time_fused_s"] < data["modeled_time_op_by_op_s"]
    text = str(report)
    assert "gpt2_block.k0" in text and "28.0%" in text


def test_low_bit_kernels_report_bits_per_weight() -> None:
    from fusec import lowprec

    q = lowprec.quantize({"w": jnp.ones((512, 256))}, lowprec.QuantSpec(3, 128))
    report = fusec.inspect(lambda p, x: x @ p["w"], q, jnp.ones((4, 512)), backend="pallas", interpret=True)
    (kernel,) = report.kernels
    assert kernel.bits_per_weight == pytest.approx(3 + 16 / 128)  # codes plus a bf16 scale per 128


def test_cli_inspect_and_source(capsys) -> None:
    assert main(["inspect", QUICKSTART + ":gpt2_block", "--gpu", "h200", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gpu"] == "NVIDIA H200 SXM" and len(data["kernels"]) == 10
    assert main(["inspect", QUICKSTART + ":gpt2_block"]) == 0
    assert "modeled on NVIDIA H100 SXM" in capsys.readouterr().out
    assert main(["source", QUICKSTART + ":gpt2_block", "--kernel", "gpt2_block.k0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# ----- kernel gpt2_block.k0") and "def k_gpt2_block_k0_body(" in out
    assert main(["source", QUICKSTART + ":gpt2_block", "--kernel", "nope"]) == 2
    assert "no kernel 'nope'" in capsys.readouterr().err
    assert main(["inspect", QUICKSTART + ":gpt2_block", "--gpu", "tpu"]) == 2
    assert "unknown GPU 'tpu'" in capsys.readouterr().err
