"""``Lowered.gpu_profile``: a static performance report of every kernel, read off its sm_90 SASS.

For each kernel: programs against SMs, CTAs per SM, registers and spills, the hot loop's
instructions per weight (or per output element), conversions, global load widths, bytes in flight
per SM, and a modeled time from :mod:`fusec.runtime.gpu_model` next to the roofline bound (which
ignores occupancy, latency and issue, so it is a bound, not a prediction). docs/gpu-model.md
explains every number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fusec.codegen.pallas import tile_programs
from fusec.codegen.pallas_refs import identifier
from fusec.ir import LowBitType
from fusec.report import _dtype_of
from fusec.roofline import LAUNCH_OVERHEAD_S, modeled_time
from fusec.roofline import gpu as roofline_gpu
from fusec.runtime.gpu_compile import compile_kernel_artifacts
from fusec.runtime.gpu_model import Modeled, model, model_gpu
from fusec.runtime.gpu_work import kernel_work, workspace_bytes
from fusec.runtime.triton_compile import compile_triton_kernel


@dataclass(frozen=True)
class KernelProfile:
    name: str
    programs: int
    warps_per_cta: int
    num_stages: int
    registers: int
    spills: int  # bytes, spill stores + spill loads
    shared_bytes: int  # per CTA, static + dynamic
    instructions: int  # SASS instructions in the kernel (static)
    hot_loop_instructions: int  # in the largest loop's body (0 without a loop)
    loop_trips: int  # of fusec's tile loop (1 without one)
    per: str  # "weight" (kernels reading a low-bit weight) or "output" (element)
    elements: int  # weights or output elements
    instructions_per_element: float  # thread-instructions of the hot loop (the whole kernel without one)
    conversions_per_element: float
    global_load_bits: tuple[int, ...]  # widths of the global loads in the hot loop, widest first
    mix: dict[str, int]  # the hot loop's (or kernel's) instructions by category
    modeled: Modeled
    roofline_bound_s: float  # max(bytes / bandwidth, FLOPs / peak), without launch overhead
    split: int = 1  # programs sharing one output tile's K loop (split-K)

    @property
    def modeled_us(self) -> float:
        return self.modeled.time_s * 1e6

    @property
    def ctas_per_sm(self) -> int:
        return self.modeled.occupancy.ctas_per_sm

    @property
    def inflight_bytes_per_sm(self) -> float:
        return self.modeled.inflight_bytes_per_sm

    @property
    def peak_share(self) -> float:
        """Modeled share of HBM peak bandwidth: compulsory bytes / bandwidth / modeled time."""
        return self.modeled.bandwidth_share


COLUMNS = ("kernel", "programs", "CTAs/SM", "regs", "spills", "loop instr", "instr/el", "cvt/el", "LDG bits",
           "in flight/SM", "roofline bound us", "modeled us", "% HBM peak", "bound by")


def _row(k: KernelProfile) -> tuple[str, ...]:
    unit = "w" if k.per == "weight" else "o"
    return (k.name, str(k.programs), f"{k.ctas_per_sm} ({k.modeled.occupancy.limiter[:4]})", str(k.registers),
            str(k.spills), str(k.hot_loop_instructions or "-"), f"{k.instructions_per_element:.2f}/{unit}",
            f"{k.conversions_per_element:.2f}/{unit}", "/".join(map(str, k.global_load_bits)) or "-",
            f"{k.inflight_bytes_per_sm / 1024:.1f} KB", f"{k.roofline_bound_s * 1e6:.2f}", f"{k.modeled_us:.2f}",
            f"{100 * k.peak_share:.1f}", k.modeled.bound_by)


@dataclass(frozen=True)
class GpuProfile:
    gpu: str
    arch: int
    kernels: tuple[KernelProfile, ...]

    def __str__(self) -> str:
        rows = [COLUMNS] + [_row(k) for k in self.kernels]
        widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
        lines = [f"fusec static GPU profile (sm_{self.arch} SASS, modeled on {self.gpu}; roofline bound = "
                 f"bytes/bandwidth or FLOPs/peak, modeled = docs/gpu-model.md)"]
        lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                  for r in rows]
        return "\n".join(lines)


def build_gpu_profile(lowered: Any, arch: int = 90, gpu: str = "h100") -> GpuProfile:
    """Compiles every kernel of a ``Lowered`` for ``sm_{arch}``, reads its SASS and models it on ``gpu``."""
    if arch != 90:
        raise ValueError(f"the static GPU model describes sm_90 GPUs (H100, H200); got arch={arch}")
    spec = model_gpu(gpu)
    roof = roofline_gpu(gpu)
    module = lowered.program.module
    compiled = _compiled_kernels(lowered, arch)
    profiles = []
    for op in module.entry.ops:
        if op.opcode != "kernel":
            continue
        name = str(op.attr("callee"))
        ck = compiled.get("k_" + identifier(name))
        if ck is None:
            continue  # a kernel that did not become a Triton kernel
        # The GPU tiling's trips (the op in the module may be tiled for an interpreter).
        gpu = lowered.program.kernels[name].for_gpu() if name in lowered.program.kernels else None
        tiled = gpu.op if gpu is not None and gpu.op is not None else op
        programs = tile_programs(tiled, gpu.module if gpu is not None and gpu.module is not None else module)
        trips = max([int(o.attr("trips")) for f in programs[:1] for o in f.ops if o.opcode == "loop"], default=1)
        read, written, flops = int(op.attr("bytes_read")), int(op.attr("bytes_written")), int(op.attr("flops"))
        work, whole, hot = kernel_work(ck, trips, read + written, spec, workspace_bytes(tiled, programs[0]))
        low_bit = [v for v in op.operands if isinstance(v.type.elem, LowBitType)]
        per = "weight" if low_bit else "output"
        elements = sum(v.type.size for v in (low_bit or op.results))
        counted = hot if hot.total else whole
        runs = trips if hot.total else 1
        scale = 32 * ck.num_warps * ck.programs * runs / max(elements, 1)
        roofline = modeled_time(roof, read + written, flops, _dtype_of(module, name)) - LAUNCH_OVERHEAD_S
        profiles.append(KernelProfile(
            name, ck.programs, ck.num_warps, ck.num_stages, ck.resources.registers, ck.resources.spills,
            work.shared_bytes, whole.total, hot.total, trips, per, elements, counted.total * scale,
            counted.conversions * scale, tuple(8 * w for w in counted.global_load_widths), counted.by_category,
            model(work, spec), roofline, int(tiled.attr("split", 1))))
    return GpuProfile(spec.name, arch, tuple(profiles))


def _compiled_kernels(lowered: Any, arch: int) -> dict[str, Any]:
    """Every GPU kernel compiled for ``sm_{arch}``, by kernel name: Pallas kernels from the program
    lowered for cuda (the Triton IR inside its custom calls), the Triton backend's from their
    source (jax-triton's custom calls carry compiled code, not Triton IR)."""
    specs = lowered.program.distinct_kernels
    compiled: dict[str, Any] = {}
    if any(s.backend == "pallas" for s in specs):
        compiled |= {ck.name: ck for ck in compile_kernel_artifacts(lowered.lower_for("cuda"), arch, sass=True)}
    for s in specs:
        gpu = s.for_gpu() if s.backend == "triton" else None
        if gpu is not None and gpu.backend == "triton" and gpu.backend_kernel is not None:
            ck = compile_triton_kernel(gpu.backend_kernel, arch)
            compiled[ck.name] = ck
    return compiled
