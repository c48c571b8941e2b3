"""The static GPU profile: SASS parsing on a hand-written listing, the sm_90 model against hand
arithmetic, and real kernels compiled for sm_90 on this (GPU-less) machine."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusec
from fusec import lowprec
from fusec.runtime.gpu_model import H100, H200, KernelWork, mma_clocks, model, occupancy
from fusec.runtime.sass import hot_loop, loops, mix, mma_flops, parse_resource_usage, parse_sass, tail_round_trips

# A toy kernel: a prologue load, an outer loop (0x40..0x140) holding an inner one (0xd0..0x100), an
# epilogue, then the padding every kernel ends with (a branch to itself and NOPs).
TOY = """
\t.target\tsm_90a
//--------------------- .text.toy       --------------------------
\t.section\t.text.toy,"ax",@progbits
toy:
.text.toy:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   ULDC.64 UR4, c[0x0][0x208] ;
        /*0030*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
.L_x_0:
        /*0040*/                   DEPBAR.LE SB0, 0x0 ;
        /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0060*/                   LDGSTS.E.BYPASS.128 [R9+0x2000], desc[UR4][R6.64] ;
        /*0070*/                   LDG.E.U16 R16, desc[UR4][R12.64] ;
        /*0080*/                   LOP3.LUT R18, R12, 0xf, RZ, 0xc0, !PT ;
        /*0090*/                   SHF.R.U32.HI R19, RZ, 0x4, R12 ;
        /*00a0*/                   PRMT R17, R18, 0x5410, R19 ;
        /*00b0*/                   I2F.BF16 R18, R18 ;
        /*00c0*/                   I2F.BF16 R19, R19 ;
.L_x_1:
        /*00d0*/                   FFMA R20, R18, R19, R20 ;
        /*00e0*/                   IADD3 R21, R21, 0x1, RZ ;
        /*00f0*/                   ISETP.NE.AND P1, PT, R21, 0x4, PT ;
        /*0100*/               @P1 BRA `(.L_x_1) ;
        /*0110*/                   HMMA.16816.F32.BF16 R24, R40, R20, R24 ;
        /*0120*/                   UIADD3 UR6, UR6, 0x1, URZ ;
        /*0130*/                   ISETP.NE.AND P0, PT, R22, 0x80, PT ;
        /*0140*/               @P0 BRA `(.L_x_0) ;
        /*0150*/                   F2FP.BF16.F32.PACK_AB R14, R20, R24 ;
        /*0160*/                   STG.E.128 desc[UR4][R2.64], R12 ;
        /*0170*/                   EXIT ;
.L_x_2:
        /*0180*/                   BRA `(.L_x_2);
        /*0190*/                   NOP;
        /*01a0*/                   NOP;
"""

RES_USAGE = """Resource usage:
 Common:
  GLOBAL:0
 Function toy:
  REG:72 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:576 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_toy_listing() -> None:
    (func,) = parse_sass(TOY)
    assert func.name == "toy" and len(func.instructions) == 27
    assert len(func.executable()) == 24  # without the two NOPs and the branch to itself
    assert func.labels == {".L_x_0": 0x40, ".L_x_1": 0xD0, ".L_x_2": 0x180}
    assert func.instructions[16].predicate == "@P1" and func.instructions[16].target == ".L_x_1"
    assert sorted((lp.start, lp.end, len(lp)) for lp in loops(func)) == [(0x40, 0x140, 17), (0xD0, 0x100, 4)]


def test_hot_loop_mix_counts_by_hand() -> None:
    (func,) = parse_sass(TOY)
    loop = hot_loop(func)
    assert loop is not None and (loop.start, loop.end) == (0x40, 0x140)
    m = mix(loop.instructions)
    assert m.total == 17
    assert m.by_category == {"barrier": 2, "global_load": 2, "int_bits": 3, "conversion": 2, "fp32": 1,
                             "int_arith": 3, "branch": 2, "mma": 1, "uniform": 1}
    assert m.global_load_bytes == 16 + 2 and m.async_load_bytes == 16 and m.global_load_widths == (16, 2)
    assert m.slow_conversions == 2 and m.mma == ("HMMA.16816.F32.BF16",)
    assert m.by_opcode["LOP3"] == m.by_opcode["SHF"] == m.by_opcode["PRMT"] == 1


def test_whole_kernel_mix_and_resource_usage() -> None:
    (func,) = parse_sass(TOY)
    m = mix(func.executable())
    assert m.total == 24
    assert m.count("global_load") == 3 and m.global_load_bytes == 16 + 16 + 2
    assert m.count("global_store") == 1 and m.global_store_bytes == 16
    assert m.conversions == 3 and m.slow_conversions == 2  # F2FP is a conversion, not on the slow unit
    assert m.count("branch") == 3 and m.count("other") == 2 and m.count("uniform") == 2
    assert parse_resource_usage(RES_USAGE)["toy"].registers == 72
    assert parse_resource_usage(RES_USAGE)["toy"].shared == 1024


def test_mma_shapes_and_rates() -> None:
    assert mma_flops("HMMA.16816.F32.BF16") == 2 * 16 * 8 * 16
    assert mma_flops("HMMA.1688.F32.TF32") == 2 * 16 * 8 * 8
    assert mma_flops("IMMA.16832.S8.S8") == 2 * 16 * 8 * 32
    # 4096 bf16 FLOPs per SM clock: an m16n8k16 bf16 MMA is 1 clock; a TF32 m16n8k8 also 1 (half rate).
    assert mma_clocks(["HMMA.16816.F32.BF16", "HMMA.1688.F32.TF32"], H100) == pytest.approx(2.0)


def test_occupancy_by_hand() -> None:
    # 72 registers: 72*32 = 2304 per warp; 16384 // 2304 = 7 warps per scheduler, 28 per SM, 7 CTAs of 4.
    # Shared: 11264 + 1024 reserved = 12288 -> 233472 // 12288 = 19 CTAs. Warps: 64 // 4 = 16.
    occ = occupancy(72, 4, 11264, H100)
    assert (occ.ctas_per_sm, occ.limiter, occ.by_registers, occ.by_shared, occ.by_warps) == (7, "registers", 7, 19, 16)
    # 100 KB of shared memory: (102400 + 1024) rounded to 128 -> 2 CTAs; 40 registers allow 12 of 4 warps.
    big = occupancy(40, 4, 100 * 1024, H100)
    assert (big.ctas_per_sm, big.limiter, big.by_registers) == (2, "shared memory", 12)
    assert occupancy(300, 4, 0, H100).ctas_per_sm == 0


def test_model_toy_config_by_hand() -> None:
    work = KernelWork(programs=264, warps_per_cta=4, registers=64, shared_bytes=0, warp_instructions=1000,
                      slow_conversions=10, mma_clocks=0.0, load_bytes_per_cta=64 * 1024,
                      inflight_bytes_per_cta=8 * 1024, compulsory_bytes=264 * 64 * 1024)
    got = model(work, H100)
    f, lat = 1.755e9, 700e-9
    assert got.occupancy.ctas_per_sm == 8  # 64 regs: 2048 per warp, 8 warps per scheduler, 32 per SM
    assert (got.ctas_on_busiest_sm, got.resident_ctas, got.active_sms) == (2, 2, 132)
    assert got.issue_s == pytest.approx(8 * 1000 / (4 * f))  # 8 warps on the SM, 4 schedulers
    assert got.conversion_s == pytest.approx(8 * 32 * 10 / (16 * f))
    assert got.bandwidth_s == pytest.approx(264 * 65536 / 3.35e12)
    assert got.inflight_bytes_per_sm == 16 * 1024
    assert got.latency_s == pytest.approx(2 * 65536 * lat / (16 * 1024))  # 8 round trips
    assert got.bound_by == "bandwidth"
    assert got.time_s == pytest.approx(lat + 264 * 65536 / 3.35e12)
    assert got.bandwidth_share == pytest.approx(got.bandwidth_s / got.time_s)
    # On H200 the same bytes take 3.6 us at 4.8 TB/s, below the latency chain (8 x 0.7 us, less the fill).
    h200 = model(work, H200)
    assert h200.bound_by == "latency" and h200.time_s == pytest.approx(8 * lat)
    # One CTA of one warp: one scheduler issues; a tiny kernel is one memory latency.
    tiny = model(KernelWork(1, 1, 32, 0, 100, 0, 0.0, 4096, 4096, 8192), H100)
    assert tiny.issue_s == pytest.approx(100 / f) and tiny.bound_by == "latency"
    # A split-K fixup's 3 serial L2 round trips (150 ns each) come after everything else.
    fixup = model(dataclasses.replace(work, tail_round_trips=3), H100)
    assert fixup.tail_s == pytest.approx(3 * 150e-9) and got.tail_s == 0.0
    assert fixup.time_s == pytest.approx(got.time_s + 3 * 150e-9) and fixup.bound_by == "bandwidth"


# -- real kernels, compiled for sm_90 on this machine -------------------------------------------------------

def _tools_or_skip() -> None:
    pytest.importorskip("triton")
    from fusec.runtime.gpu_compile import tool

    missing = [t for t in ("ptxas-blackwell", "nvdisasm", "cuobjdump") if tool(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (shipped in the triton wheel)")


def _profile(fn, *args):
    lowered = fusec.jit(fn, backend="pallas", interpret=False).lower(*args)
    op = [op for op in lowered.program.module.entry.ops if op.opcode == "kernel"][0]  # the first
    return lowered.gpu_profile(90, "h100"), op, lowered


def test_elementwise_add_f32_1000() -> None:
    _tools_or_skip()
    s = jax.ShapeDtypeStruct((1000,), jnp.float32)
    profile, op, _ = _profile(lambda a, b: a + b, s, s)
    (k,) = profile.kernels
    block = op.attr("block")[0]  # one program of 1024 elements (masked to 1000)
    assert k.programs == math.prod(op.attr("grid")) == 1 and k.spills == 0 and k.hot_loop_instructions == 0
    threads = 32 * k.warps_per_cta
    # Each thread loads its share of both inputs in 16-byte vectors: 2 * 1024 * 4 bytes in all.
    assert k.global_load_bits == (128,)
    assert k.mix["global_load"] * 16 * threads == 2 * block * 4
    assert k.mix["global_store"] * 16 * threads == block * 4
    assert k.instructions_per_element == pytest.approx(k.instructions * threads / 1000)
    assert k.modeled.bound_by == "latency" and k.modeled_us < 1.0


def test_small_int4_gemv_hot_loop() -> None:
    _tools_or_skip()
    k_dim, n = 256, 256
    w = jnp.asarray(np.random.default_rng(0).standard_normal((k_dim, n)) * 0.02, jnp.bfloat16)
    q = lowprec.quantize({"w": w}, lowprec.QuantSpec(4, 128))["w"]
    profile, op, lowered = _profile(lambda q, x: x @ q, q, jax.ShapeDtypeStruct((1, k_dim), jnp.bfloat16))
    # One kernel: the GEMV casts its f32 sum to bfloat16 itself (a split one in the last program).
    (k,) = profile.kernels
    assert k.per == "weight"
    tile = lowered.program.module.function(str(op.attr("tile")))
    fixup = any(o.opcode == "arrive" for o in tile.ops)
    assert fixup == (op.attr("split", 1) > 1)
    assert k.modeled.tail_s == pytest.approx(3 * 150e-9 if fixup else 0.0)
    (loop,) = [o for o in tile.ops if o.opcode == "loop"]
    assert k.programs == math.prod(op.attr("grid")) * op.attr("split", 1) and k.spills == 0
    assert k.loop_trips == int(loop.attr("trips")) > 1 and k.hot_loop_instructions > 0
    assert k.per == "weight" and k.elements == k_dim * n
    threads = 32 * k.warps_per_cta
    want = k.hot_loop_instructions * threads * k.programs * k.loop_trips / (k_dim * n)
    assert k.instructions_per_element == pytest.approx(want)
    # Every K step loads at least its share of the packed weights (4 bits each).
    step_weight_bytes = k_dim * n // 2 / (k.programs * k.loop_trips)
    assert k.modeled.inflight_bytes_per_sm >= step_weight_bytes
    # The paired decode: codes ORed into bfloat16 bit patterns, two per 32-bit operation, the bias
    # and scale applied after the dot: no conversions and no packed bfloat16 arithmetic per weight.
    assert op.attr("strategy") == "gemv-pairs"
    assert k.conversions_per_element == 0 and k.mix["mma"] > 0 and k.mix.get("fp16x2", 0) == 0


def test_cli_inspect_sass(tmp_path: Path, capsys) -> None:
    _tools_or_skip()
    from fusec.cli import main

    path = tmp_path / "prog.py"
    path.write_text("def add(a, b):\n    return a + b\n")
    args = ["inspect", f"{path}:add", "--args", "a=f32[1000] b=f32[1000]", "--sass", "--gpu", "h200"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "modeled on NVIDIA H200 SXM" in out and "roofline bound us" in out and "modeled us" in out
    assert any(line.startswith("add.k0 ") for line in out.splitlines())
    assert main(args + ["--json"]) == 0
    (kernel,) = json.loads(capsys.readouterr().out)["kernels"]
    assert kernel["programs"] == 1 and kernel["spills"] == 0
    assert main(["inspect", f"{path}:add", "--args", "a=f32[8] b=f32[8]", "--sass", "--gpu", "a100"]) == 2


# The tails of two split-K fixups as ptxas writes them (addresses renumbered): relaxed adds, then
# one thread's acq_rel count and the reload; and acq_rel adds, each fenced, then the same.
_TAILS = """//--------------------- .text.tail       --------------------------
        /*0000*/                   REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU desc[UR12][R2.64], R8 ;
        /*0010*/                   REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU desc[UR12][R2.64+0x8000], R40 ;
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0030*/               @P1 MEMBAR.ALL.GPU ;
        /*0040*/               @P1 ATOMG.E.ADD.STRONG.GPU PT, R3, desc[UR12][R4.64], R3 ;
        /*0050*/               @P1 CCTL.IVALL ;
        /*0060*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0070*/               @P2 LDG.E.128 R8, desc[UR12][R2.64] ;
        /*0080*/               @P2 STG.E.64 desc[UR12][R6.64], R8 ;
        /*0090*/                   EXIT ;
//--------------------- .text.fenced       --------------------------
        /*0000*/                   MEMBAR.ALL.GPU ;
        /*0010*/                   ATOMG.E.ADD.F32x4.FTZ.RN.STRONG.GPU PT, RZ, desc[UR8][R6.64], R44 ;
        /*0020*/                   MEMBAR.ALL.GPU ;
        /*0030*/                   ATOMG.E.ADD.F32x4.FTZ.RN.STRONG.GPU PT, RZ, desc[UR8][R4.64+0x8000], R12 ;
        /*0040*/                   MEMBAR.ALL.GPU ;
        /*0050*/               @P1 ATOMG.E.ADD.STRONG.GPU PT, R3, desc[UR12][R4.64], R3 ;
        /*0060*/               @P2 LDG.E.128 R8, desc[UR12][R2.64] ;
        /*0070*/                   EXIT ;
"""


def test_tail_round_trips_by_hand() -> None:
    relaxed, fenced = parse_sass(_TAILS)
    # The release waits for the adds, the count comes back, the reload: 3.
    assert tail_round_trips(relaxed.executable()) == 3
    # The first fence has nothing to wait for; the second and third wait for an add each: 2 + 2.
    assert tail_round_trips(fenced.executable()) == 4
    # A plain store at the end waits for nothing (no kernel's final drain is charged).
    assert tail_round_trips(relaxed.executable()[-2:]) == 0


def test_split_gemv_fixup_tail_is_three_round_trips() -> None:
    """A split bfloat16 GEMV finishes its cast itself: relaxed adds (Pallas's acq_rel atomics would
    fence each one), then the release, the arrival count and the reload: 3 L2 round trips."""
    _tools_or_skip()
    k_dim, n = 1024, 256
    w = jnp.asarray(np.random.default_rng(1).standard_normal((k_dim, n)) * 0.02, jnp.bfloat16)
    q = lowprec.quantize({"w": w}, lowprec.QuantSpec(4, 128))["w"]
    profile, op, _ = _profile(lambda q, x: x @ q, q, jax.ShapeDtypeStruct((1, k_dim), jnp.bfloat16))
    (k,) = profile.kernels
    assert op.attr("split", 1) > 1 and k.spills == 0
    assert k.modeled.tail_s == pytest.approx(3 * 150e-9)
    assert k.modeled.bandwidth_share < k.modeled.bandwidth_s / k.modeled.time_s  # the workspace is not useful
