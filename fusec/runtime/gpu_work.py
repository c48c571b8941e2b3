"""One compiled kernel's work as the sm_90 model sees it, read off its SASS and launch."""

from __future__ import annotations

from fusec.ir import Function, Op
from fusec.ir.tile_ops import scratch_params
from fusec.passes.cost import nbytes
from fusec.runtime.gpu_compile import CompiledKernel
from fusec.runtime.gpu_model import GpuModelSpec, KernelWork, mma_clocks
from fusec.runtime.sass import Mix, mix, parse_sass
from fusec.runtime.sass import hot_loop as find_hot_loop

# A split-K fixup's serial L2 round trips after its stream: the release that waits for the partial
# sums' adds, the arrival count's atomic, and the reload of the finished sum (docs/gpu-model.md).
FIXUP_ROUND_TRIPS = 3


def fixup_work(op: Op, program: Function) -> tuple[int, int]:
    """For a kernel op and its tile program: the L2 round trips of its split-K fixup tail (0
    without one) and the bytes of its own workspace (f32 sums and counters, written through L2 and
    counted as HBM traffic as every byte is)."""
    arrives = any(o.opcode == "arrive" for o in program.ops)
    return (FIXUP_ROUND_TRIPS if arrives else 0), sum(nbytes(p.type) for p in scratch_params(op, program))


def kernel_work(ck: CompiledKernel, trips: int, compulsory: int, spec: GpuModelSpec,
                tail_round_trips: int = 0, workspace: int = 0) -> tuple[KernelWork, Mix, Mix]:
    """The model's view of one compiled kernel whose tile loop runs ``trips`` times: its work, and
    the instruction mix of the whole kernel and of its hot loop."""
    funcs = parse_sass(ck.sass)
    func = next((f for f in funcs if f.name == ck.name), funcs[0] if funcs else None)
    if func is None:
        raise RuntimeError(f"no SASS for kernel {ck.name} (is nvdisasm installed?)")
    body = func.executable()
    loop = find_hot_loop(func)
    whole = mix(body)
    hot = mix(loop.instructions) if loop is not None else mix(())
    extra = max(trips - 1, 0) if loop is not None else 0  # runs of the loop body beyond the one in ``whole``
    threads = 32 * ck.num_warps
    overlap = max(1, ck.num_stages - 1)  # K steps whose async copies are in flight at once
    if loop is not None:
        inflight = hot.async_load_bytes * overlap + (hot.global_load_bytes - hot.async_load_bytes)
    else:
        inflight = whole.global_load_bytes
    work = KernelWork(
        programs=ck.programs, warps_per_cta=ck.num_warps, registers=ck.resources.registers,
        shared_bytes=ck.shared_dynamic + ck.shared_static,
        warp_instructions=whole.total + hot.total * extra,
        slow_conversions=whole.slow_conversions + hot.slow_conversions * extra,
        mma_clocks=mma_clocks(whole.mma, spec) + mma_clocks(hot.mma, spec) * extra,
        load_bytes_per_cta=threads * (whole.global_load_bytes + hot.global_load_bytes * extra),
        inflight_bytes_per_cta=threads * inflight, compulsory_bytes=compulsory, workspace_bytes=workspace,
        tail_round_trips=tail_round_trips)
    return work, whole, hot
