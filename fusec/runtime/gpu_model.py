"""An explicit occupancy and latency/issue/bandwidth model of one kernel on an sm_90 GPU.

The inputs are counts read off the kernel's SASS (:mod:`fusec.runtime.sass`) and its launch; the
output is a modeled time, the term that binds it, and the occupancy behind it. Every constant and
formula is written out in docs/gpu-model.md with its source; nothing here is fitted to
measurements. The model ignores caches (every byte comes from HBM), instruction dependency latency,
shared-memory bank conflicts and predication (a predicated-off instruction counts as executed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fusec.runtime.sass import mma_flops


@dataclass(frozen=True)
class GpuModelSpec:
    """An NVIDIA sm_90 GPU, as the model sees it (sources in docs/gpu-model.md)."""

    name: str
    hbm_bytes_per_s: float
    sms: int = 132
    schedulers_per_sm: int = 4  # warp instructions issued per clock per SM
    clock_hz: float = 1.755e9
    memory_latency_s: float = 700e-9  # an HBM load's round trip under load (an assumption)
    l2_latency_s: float = 150e-9  # an L2 hit's (or an atomic's) round trip, ~260 clocks (an assumption)
    regs_per_sm: int = 65536
    reg_alloc_unit: int = 256  # registers are given to warps in units of 256
    max_regs_per_thread: int = 255
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32
    smem_per_sm: int = 228 * 1024
    smem_reserved_per_cta: int = 1024
    smem_alloc_unit: int = 128
    conversions_per_clock_per_sm: int = 16  # I2F/F2F/F2I results
    mma_flops_per_clock_per_sm: int = 4096  # dense bf16/fp16 tensor-core FLOPs (2 x FMAs)


H100 = GpuModelSpec("NVIDIA H100 SXM", 3.35e12)
H200 = GpuModelSpec("NVIDIA H200 SXM", 4.8e12)
MODEL_GPUS = {"h100": H100, "h200": H200}


def model_gpu(name: str) -> GpuModelSpec:
    try:
        return MODEL_GPUS[name.lower()]
    except KeyError:
        raise ValueError(f"the SASS model knows sm_90 GPUs only ({', '.join(MODEL_GPUS)}), not {name!r}") from None


def mma_rate_factor(opcode: str) -> float:
    """Tensor-core throughput of an MMA's input type relative to bf16: TF32 half, int8/fp8 double."""
    mods = set(opcode.split(".")[1:])
    if "TF32" in mods:
        return 0.5
    if opcode.startswith(("IMMA", "QMMA")) or mods & {"S8", "U8", "E4M3", "E5M2"}:
        return 2.0
    return 1.0


def mma_clocks(opcodes: tuple[str, ...] | list[str], spec: GpuModelSpec) -> float:
    """SM clocks of tensor-core work the given warp-level MMA instructions take at the peak rate."""
    return sum(mma_flops(op) / (spec.mma_flops_per_clock_per_sm * mma_rate_factor(op)) for op in opcodes)


@dataclass(frozen=True)
class Occupancy:
    ctas_per_sm: int  # how many CTAs of this kernel fit on one SM at once
    limiter: str  # "registers", "shared memory", "warps" or "CTA slots"
    by_registers: int
    by_shared: int
    by_warps: int


def occupancy(registers: int, warps_per_cta: int, shared_bytes: int, spec: GpuModelSpec) -> Occupancy:
    """CTAs per SM as CUDA's occupancy calculator (``cuda_occupancy.h``) computes them for sm_90."""
    regs_per_warp = math.ceil(max(registers, 1) * 32 / spec.reg_alloc_unit) * spec.reg_alloc_unit
    warps_per_partition = (spec.regs_per_sm // spec.schedulers_per_sm) // regs_per_warp
    by_regs = (warps_per_partition * spec.schedulers_per_sm) // warps_per_cta
    if registers > spec.max_regs_per_thread:
        by_regs = 0
    smem = math.ceil((shared_bytes + spec.smem_reserved_per_cta) / spec.smem_alloc_unit) * spec.smem_alloc_unit
    by_smem = spec.smem_per_sm // smem
    by_warps = spec.max_warps_per_sm // warps_per_cta
    limits = {"registers": by_regs, "shared memory": by_smem, "warps": by_warps, "CTA slots": spec.max_ctas_per_sm}
    limiter = min(limits, key=lambda k: limits[k])
    return Occupancy(limits[limiter], limiter, by_regs, by_smem, by_warps)


@dataclass(frozen=True)
class KernelWork:
    """What one kernel does, per warp and per CTA, as the model needs it (from SASS and launch)."""

    programs: int  # CTAs in the grid
    warps_per_cta: int
    registers: int
    shared_bytes: int  # static + dynamic shared memory per CTA
    warp_instructions: float  # instructions each warp executes, loops multiplied by their trips
    slow_conversions: float  # I2F/F2F/F2I instructions each warp executes
    mma_clocks: float  # tensor-core SM clocks each warp's MMAs take (see mma_clocks)
    load_bytes_per_cta: float  # global bytes one CTA loads over its life
    inflight_bytes_per_cta: float  # global bytes one CTA has requested and not yet received
    compulsory_bytes: int  # bytes the kernel must move to and from HBM (fusec's cost model)
    workspace_bytes: int = 0  # bytes of the kernel's own workspace it moves too (a fixup's f32 sums): time,
    # not useful traffic (the share of peak leaves them out)
    tail_round_trips: int = 0  # L2 round trips each CTA waits out, one after another, after its last
    # load: a split-K fixup's release, arrival counter and reload of the finished sum (3)


@dataclass(frozen=True)
class Modeled:
    occupancy: Occupancy
    ctas_on_busiest_sm: int  # ceil(programs / SMs)
    resident_ctas: int  # of those, at once
    active_sms: int
    inflight_bytes_per_sm: float
    issue_s: float
    conversion_s: float
    mma_s: float
    bandwidth_s: float
    latency_s: float  # Little's law: bytes the busiest SM loads x latency / bytes it has in flight
    fill_s: float
    tail_s: float  # tail_round_trips x L2 latency, after everything else
    time_s: float
    bound_by: str  # the largest term: "issue", "conversions", "mma", "bandwidth" or "latency" (also when
    # every term is below one memory latency)
    bandwidth_share: float  # compulsory bytes / HBM bandwidth / time_s: the share of HBM peak the kernel reaches


def model(work: KernelWork, spec: GpuModelSpec) -> Modeled:
    """time = fill + max(issue, conversions, mma, bandwidth, latency - fill) + tail, with

    - issue: the busiest SM's warp instructions / (min(schedulers, resident warps) x clock)
    - conversions: its conversion results / (16 per clock x clock)
    - mma: its tensor-core clocks / clock
    - bandwidth: (compulsory + workspace bytes) / HBM bandwidth
    - latency: its load bytes x memory latency / its bytes in flight (Little's law)
    - fill: one memory latency, before the first bytes arrive;
    - tail: the kernel's serial L2 round trips after its stream (a split-K fixup's), which no
      other CTA's work hides: they come after the last bytes arrive.
    """
    occ = occupancy(work.registers, work.warps_per_cta, work.shared_bytes, spec)
    programs = max(work.programs, 1)
    busiest = math.ceil(programs / spec.sms)
    resident = max(min(busiest, occ.ctas_per_sm), 1)
    active = min(spec.sms, programs)
    warps = busiest * work.warps_per_cta
    issuers = min(spec.schedulers_per_sm, resident * work.warps_per_cta)
    issue = warps * work.warp_instructions / (issuers * spec.clock_hz)
    conversions = warps * 32 * work.slow_conversions / (spec.conversions_per_clock_per_sm * spec.clock_hz)
    mma = warps * work.mma_clocks / spec.clock_hz
    bandwidth = (work.compulsory_bytes + work.workspace_bytes) / spec.hbm_bytes_per_s
    inflight = resident * work.inflight_bytes_per_cta
    loaded = busiest * work.load_bytes_per_cta
    latency = loaded * spec.memory_latency_s / inflight if inflight > 0 else 0.0
    fill = spec.memory_latency_s
    terms = {"issue": issue, "conversions": conversions, "mma": mma, "bandwidth": bandwidth,
             "latency": max(latency - fill, 0.0)}
    bound = max(terms, key=lambda k: terms[k])
    tail = work.tail_round_trips * spec.l2_latency_s
    time = fill + terms[bound] + tail
    if terms[bound] < fill:
        bound = "latency"  # one memory round trip is most of the time
    useful = work.compulsory_bytes / spec.hbm_bytes_per_s
    return Modeled(occ, busiest, resident, active, inflight, issue, conversions, mma, bandwidth, latency, fill,
                   tail, time, bound, useful / time)
