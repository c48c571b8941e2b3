"""Hand-written Triton kernels compiled from their source to cubins for sm_80 and sm_90 on this
machine (no GPU needed): 0 spills, registers within the launch's budget, SASS that fusec reads."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fusec.runtime import sass as sass_lib
from fusec.runtime.gpu_compile import tool
from fusec.runtime.triton_compile import compile_triton_kernel, kernel_signature
from tests.triton_samples import SAMPLES, VECTOR_ADD

pytestmark = pytest.mark.skipif(tool("ptxas-blackwell") is None, reason="ptxas-blackwell (in the triton wheel) missing")


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_samples_compile_to_cubins_without_spills(name: str, arch: int) -> None:
    kernel = SAMPLES[name].kernel
    compiled = compile_triton_kernel(kernel, arch)
    r = compiled.resources
    assert (r.name, r.arch) == (kernel.name, arch)
    assert r.spills == 0, r
    # 65536 registers per SM shared by the launch's threads: one block must fit.
    assert 0 < r.registers <= min(255, 65536 // (32 * kernel.num_warps)), r
    assert compiled.cubin[:4] == b"\x7fELF" and r.cubin_bytes == len(compiled.cubin)
    assert compiled.grid == (*kernel.grid, *(1,) * (3 - len(kernel.grid)))
    assert (compiled.num_warps, compiled.num_stages) == (kernel.num_warps, kernel.num_stages)
    if compiled.sass:
        (function,) = [f for f in sass_lib.parse_sass(compiled.sass) if f.name == kernel.name]
        counts = sass_lib.mix(function.instructions)
        assert counts.count("global_load") > 0 and counts.count("global_store") > 0
        # Atomics (RED/ATOMG) exactly where the kernel accumulates into a zeroed output.
        atomics = counts.by_opcode.get("RED", 0) + counts.by_opcode.get("ATOMG", 0)
        assert (atomics > 0) == bool(kernel.zeroed_outputs), counts.by_opcode


def test_a_source_whose_parameters_do_not_match_the_description_is_refused() -> None:
    with pytest.raises(ValueError, match="expected 3 pointers then the constexprs"):
        kernel_signature(VECTOR_ADD, ["x_ptr", "y_ptr", "N", "BLOCK"])
    with pytest.raises(ValueError, match="no Triton element type for dtype 'complex64'"):
        kernel_signature(replace(VECTOR_ADD, outputs=(replace(VECTOR_ADD.outputs[0], dtype="complex64"),)),
                         ["x_ptr", "y_ptr", "o_ptr", "N", "BLOCK"])
    assert kernel_signature(VECTOR_ADD, ["x_ptr", "y_ptr", "o_ptr", "N", "BLOCK"]) == {
        "x_ptr": "*fp32", "y_ptr": "*fp32", "o_ptr": "*fp32", "N": "constexpr", "BLOCK": "constexpr"}
