"""One compiled kernel's work as the sm_90 model sees it, read off its SASS and launch."""

from __future__ import annotations

from fusec.ir import Function, Op
from fusec.ir.tile_ops import scratch_params
from fusec.passes.cost import nbytes
from fusec.runtime.gpu_compile import CompiledKernel
from fusec.runtime.gpu_model import GpuModelSpec, KernelWork, mma_clocks
from fusec.runtime.sass import Mix, mix, parse_sass, tail_round_trips
from fusec.runtime.sass import hot_loop as find_hot_loop


def workspace_bytes(op: Op, program: Function) -> int:
    """The bytes of a kernel's own workspace (a split-K fixup's f32 sums and counters), written
    through L2 and counted as HBM traffic as every byte is."""
    return sum(nbytes(p.type) for p in scratch_params(op, program))


def kernel_work(ck: CompiledKernel, trips: int, compulsory: int, spec: GpuModelSpec,
                workspace: int = 0) -> tuple[KernelWork, Mix, Mix]:
    """The model's view of one compiled kernel whose tile loop runs ``trips`` times: its work, and
    the instruction mix of the whole kernel and of its hot loop. Its tail is the serial round
    trips of the SASS after the hot loop (:func:`fusec.runtime.sass.tail_round_trips`: a split-K
    fixup's release, arrival count and reload; a split kernel's acq_rel atomic adds)."""
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
        tail_round_trips=tail_round_trips([i for i in body if loop is None or i.address > loop.end]))
    return work, whole, hot
