"""A roofline model: a kernel's modeled time is max(bytes / memory bandwidth, FLOPs / peak) plus a
fixed launch overhead.

Spec numbers are the vendors' published datasheet figures for dense (non-sparse) tensor-core math,
not measurements: NVIDIA A100 SXM 80GB, H100 SXM and H200 SXM datasheets, the L4 datasheet and the
Ada Lovelace architecture whitepaper (RTX 4090; its bf16/fp16 figure is with fp32 accumulation).
Limits: real kernels reach a fraction of these peaks; caches, occupancy and tile quantization are
ignored; the launch overhead is an assumed 3 microseconds per kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

LAUNCH_OVERHEAD_S = 3e-6


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bandwidth: float  # bytes/s
    peak_flops: dict[str, float]  # by operand dtype class: "bf16", "fp16", "fp8", "int8", "fp32"
    shared_memory_per_block: int  # bytes

    def peak(self, dtype: str) -> float:
        return self.peak_flops.get(dtype, self.peak_flops["fp32"])


T = 1e12
GPUS: dict[str, GpuSpec] = {
    "a100": GpuSpec("NVIDIA A100 SXM 80GB", 2039e9,
                    {"bf16": 312 * T, "fp16": 312 * T, "int8": 624 * T, "fp32": 19.5 * T}, 163 * 1024),
    "h100": GpuSpec("NVIDIA H100 SXM", 3350e9,
                    {"bf16": 989 * T, "fp16": 989 * T, "fp8": 1979 * T, "int8": 1979 * T, "fp32": 67 * T}, 227 * 1024),
    "h200": GpuSpec("NVIDIA H200 SXM", 4800e9,
                    {"bf16": 989 * T, "fp16": 989 * T, "fp8": 1979 * T, "int8": 1979 * T, "fp32": 67 * T}, 227 * 1024),
    "l4": GpuSpec("NVIDIA L4", 300e9,
                  {"bf16": 121 * T, "fp16": 121 * T, "fp8": 242.5 * T, "int8": 242.5 * T, "fp32": 30.3 * T}, 99 * 1024),
    "rtx4090": GpuSpec("NVIDIA GeForce RTX 4090", 1008e9,
                       {"bf16": 165.2 * T, "fp16": 165.2 * T, "fp8": 330.3 * T, "int8": 660.6 * T, "fp32": 82.6 * T},
                       99 * 1024),
}


def dtype_class(name: str) -> str:
    """fusec dtype name -> the peak-throughput class it runs at."""
    if name in ("bf16", "f16"):
        return "bf16" if name == "bf16" else "fp16"
    if name.startswith("f8"):
        return "fp8"
    if name in ("i8", "u8"):
        return "int8"
    return "fp32"


def modeled_time(gpu: GpuSpec, bytes_moved: int, flops: int, dtype: str) -> float:
    """Seconds: the slower of moving the bytes and doing the FLOPs, plus launch overhead."""
    return max(bytes_moved / gpu.memory_bandwidth, flops / gpu.peak(dtype_class(dtype))) + LAUNCH_OVERHEAD_S


def gpu(name: str) -> GpuSpec:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(sorted(GPUS))}") from None
