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
    assert data["version"] == 5 and data["gpu"] == "NVIDIA A100 SXM 80GB"
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
    assert "gpt2_block.k0" in text and f"({data['bytes_fused'] / data['bytes_op_by_op']:.1%})" in text
    assert "gpt2_block.attn          attention" in text


def test_low_bit_kernels_report_bits_per_weight() -> None:
    from fusec import lowprec

    q = lowprec.quantize({"w": jnp.ones((512, 256))}, lowprec.QuantSpec(3, 128))
    report = fusec.inspect(lambda p, x: x @ p["w"], q, jnp.ones((4, 512)), backend="pallas", interpret=True)
    (kernel,) = report.kernels
    assert kernel.bits_per_weight == pytest.approx(3 + 16 / 128)  # codes plus a bf16 scale per 128


def test_cli_inspect_and_source(capsys) -> None:
    assert main(["inspect", QUICKSTART + ":gpt2_block", "--gpu", "h200", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gpu"] == "NVIDIA H200 SXM" and len(data["kernels"]) == 7
    assert [k["kind"] for k in data["kernels"]].count("attention") == 1
    assert main(["inspect", QUICKSTART + ":gpt2_block"]) == 0
    assert "modeled on NVIDIA H100 SXM" in capsys.readouterr().out
    assert main(["source", QUICKSTART + ":gpt2_block", "--kernel", "gpt2_block.k0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# ----- kernel gpt2_block.k0") and "def k_gpt2_block_k0_body(" in out
    assert main(["source", QUICKSTART + ":gpt2_block", "--kernel", "nope"]) == 2
    assert "no kernel 'nope'" in capsys.readouterr().err
    assert main(["inspect", QUICKSTART + ":gpt2_block", "--gpu", "tpu"]) == 2
    assert "unknown GPU 'tpu'" in capsys.readouterr().err


def _count_eqns(jaxpr) -> int:
    """Equations with nested jit bodies expanded per call site (what the report counts)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("pjit", "jit"):
            total += _count_eqns(eqn.params["jaxpr"].jaxpr)
        else:
            total += 1
    return total


def test_equation_counts_follow_the_jaxpr() -> None:
    x, w, b = jnp.ones((8, 16)), jnp.ones((16, 32)), jnp.ones(32)

    def dense(x, w, b):
        return jnp.tanh(x @ w + b)  # dot_general, broadcast_in_dim, add, tanh

    report = fusec.inspect(dense, x, w, b, backend="pallas", interpret=True)
    assert report.num_eqns == _count_eqns(jax.make_jaxpr(dense)(x, w, b).jaxpr) == 4
    # The bias broadcast becomes a size-1 block load (a view), so three equations run in the kernel.
    assert (report.num_fused_eqns, report.num_xla_eqns) == (3, 0)
    assert report.kernels[0].primitives == ["dot_general", "add", "tanh"]

    # round has no Pallas-Triton lowering: its equation stays with XLA, and the equation counts say so.
    def with_round(x, w, b):
        return jax.lax.round(jax.jit(dense)(x, w, b)) * 2.0

    report = fusec.inspect(with_round, x, w, b, backend="pallas", interpret=True)
    assert report.num_eqns == _count_eqns(jax.make_jaxpr(with_round)(x, w, b).jaxpr) == 6
    assert report.num_xla_eqns == 1 and report.xla_ops == ["round"]
    assert report.num_fused_eqns == 4  # the nested jit's three, and the multiply
    assert "jaxpr equations: 6: 4 inside kernels, 1 run by XLA" in str(report)
    on_xla = fusec.inspect(with_round, x, w, b, backend="xla")
    assert (on_xla.num_fused_eqns, on_xla.num_xla_eqns) == (0, 5)


def test_gpt2_equation_counts(quickstart) -> None:
    args = quickstart.example_inputs()
    report = fusec.inspect(quickstart.gpt2_block, *args, backend="pallas", interpret=True)
    assert report.num_eqns == _count_eqns(jax.make_jaxpr(quickstart.gpt2_block)(*args).jaxpr)
    assert report.num_xla_eqns == 0 and 0.5 * report.num_eqns < report.num_fused_eqns < report.num_eqns
    assert sum(len(set(k.primitives)) > 0 for k in report.kernels) == len(report.kernels)
    assert any(k.primitives[:2] == ["dot_general", "add"] for k in report.kernels)


def test_scan_body_kernels_are_listed_with_their_trip_count() -> None:
    def layers(h, ws):
        return jax.lax.scan(lambda h, w: (jax.nn.gelu(h @ w) + h, None), h, ws)[0]

    h, ws = jnp.ones((8, 64)), jnp.ones((3, 64, 64))
    report = fusec.inspect(layers, h, ws, backend="pallas", interpret=True)
    (kernel,) = report.kernels
    assert (kernel.body, kernel.trips, kernel.kind) == ("scan_body", 3, "matmul")
    assert kernel.primitives[:2] == ["dot_general", "integer_pow"]
    # Each step reads h and one 64x64 weight and h again for the residual, and writes h.
    assert kernel.bytes_read + kernel.bytes_written == (8 * 64 + 64 * 64 + 8 * 64 + 8 * 64) * 4
    (loop,) = report.fallbacks
    # The loop itself moves its carry in and out, the stacked weights, and the final carry.
    loop_bytes = (8 * 64 + 3 * 64 * 64 + 8 * 64) * 4
    assert (loop["primitive"], loop["body"], loop["bytes"]) == ("scan", "", loop_bytes)
    assert report.bytes_fused == loop_bytes + 3 * (kernel.bytes_read + kernel.bytes_written)
    assert loop["share"] == pytest.approx(loop_bytes / report.bytes_fused)
    assert report.modeled_time_fused_s > 3 * kernel.modeled_time_s
    assert report.num_eqns == 1 + len(jax.make_jaxpr(lambda h, w: jax.nn.gelu(h @ w) + h)(h, ws[0]).eqns)
    assert report.num_fused_eqns == report.num_eqns - 1
    assert "in scan_body x 3" in str(report)
    data = json.loads(report.to_json())
    assert data["kernels"][0]["trips"] == 3 and data["fallbacks"][0]["bytes"] == loop_bytes


def test_while_and_cond_bodies_are_listed() -> None:
    def f(x):
        x = jax.lax.while_loop(lambda c: c[0] < 4, lambda c: (c[0] + 1, jnp.tanh(c[1]) * 2.0), (0, x))[1]
        return jax.lax.cond(x.sum() > 0, lambda v: jnp.exp(v) + 1.0, lambda v: v * v - 1.0, x)

    x = jnp.ones((16, 128))
    report = fusec.inspect(f, x, backend="pallas", interpret=True)
    assert [(k.body, k.trips) for k in report.kernels] == [("while_body", None), ("cond_branch0", 1),
                                                           ("cond_branch1", 1)]
    assert any("x ?" in line for line in str(report).splitlines() if "while_body" in line)
    assert [f["primitive"] for f in report.fallbacks] == ["while", "cond"]
    assert all(f["bytes"] > 0 and 0 < f["share"] < 1 for f in report.fallbacks)


def test_fallbacks_give_their_bytes_and_share() -> None:
    x, w, b = jnp.ones((8, 16)), jnp.ones((16, 32)), jnp.ones(32)
    report = fusec.inspect(lambda x, w, b: jax.lax.round(jnp.tanh(x @ w + b)) * 2.0, x, w, b,
                           backend="pallas", interpret=True)
    assert report.xla_ops == ["round"] and report.fallbacks == []  # round is an XLA op, not a fallback

    def with_sort(x):
        return jnp.sort(jnp.exp(x), axis=-1) * 2.0

    report = fusec.inspect(with_sort, jnp.ones((8, 16)), backend="pallas", interpret=True)
    (sort,) = report.fallbacks
    assert sort["primitive"] == "sort" and sort["bytes"] == 2 * 8 * 16 * 4 and sort["body"] == ""
    assert sort["share"] == pytest.approx(sort["bytes"] / report.bytes_fused)
    assert "sort: 1024 bytes (" in str(report)


def test_nested_scans_multiply_their_trip_counts() -> None:
    def outer(h, ws):
        inner = lambda h, w: (jnp.tanh(h @ w), None)  # noqa: E731
        return jax.lax.scan(lambda h, w2: (jax.lax.scan(inner, h, w2)[0], None), h, ws)[0]

    report = fusec.inspect(outer, jnp.ones((8, 32)), jnp.ones((2, 3, 32, 32)), backend="pallas", interpret=True)
    (kernel,) = report.kernels
    assert kernel.body == "scan_body/scan_body_1" and kernel.trips == 6


def test_a_scan_of_length_zero_runs_its_body_no_times() -> None:
    def layers(h, ws):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, ws)[0]

    report = fusec.inspect(layers, jnp.ones((8, 32)), jnp.ones((0, 32, 32)), backend="pallas", interpret=True)
    (kernel,) = report.kernels
    assert kernel.trips == 0
    assert report.bytes_fused == report.fallbacks[0]["bytes"]  # only the loop's own carries move
