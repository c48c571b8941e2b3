"""Compiling fusec's kernels all the way to GPU machine code on any machine, GPU or not.

The Pallas Triton lowering embeds each kernel's Triton IR in the lowered program; the ``triton``
package compiles it to PTX and a cubin for a chosen NVIDIA architecture, ptxas reports the
registers and spills of each kernel, and ``nvdisasm`` / ``cuobjdump`` (shipped in the same wheel)
give its SASS and resource usage (read by :mod:`fusec.runtime.sass`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fusec.runtime.jax_internals import triton_kernels_in


@dataclass(frozen=True)
class KernelResources:
    """What ptxas reports for one kernel on one architecture."""

    name: str
    arch: int
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    cubin_bytes: int

    @property
    def spills(self) -> int:
        return self.spill_store_bytes + self.spill_load_bytes


@dataclass(frozen=True)
class CompiledKernel:
    """One kernel compiled for ``sm_{arch}``: its launch, resources, cubin and SASS text."""

    resources: KernelResources
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]
    shared_dynamic: int  # bytes of dynamic shared memory Triton launches it with
    shared_static: int  # bytes of static shared memory in the cubin (cuobjdump), 0 if unknown
    cubin: bytes
    sass: str  # ``nvdisasm -c`` output, "" when nvdisasm is missing

    @property
    def name(self) -> str:
        return self.resources.name

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


def tool(name: str) -> str | None:
    """Path of a CUDA tool (``ptxas-blackwell``, ``nvdisasm``, ``cuobjdump``): the triton wheel's
    copy first, then ``PATH``, then ``/usr/local/cuda*/bin``; None when there is none."""
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.isfile(path):
            return path
    except ImportError:  # pragma: no cover - triton is a dependency of the GPU path
        pass
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/local/cuda*/bin/{name}"))
    return candidates[-1] if candidates else None


def _ptxas() -> str:
    path = tool("ptxas-blackwell")
    if path is None:
        raise RuntimeError("ptxas-blackwell not found (it ships in the triton wheel)")
    return path


def _run(args: list[str]) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


@contextlib.contextmanager
def scoped_cache_dir(path: str) -> Iterator[None]:
    """``TRITON_CACHE_DIR`` set to ``path`` (triton writes a cache: keep it out of the user's home
    directory) and put back afterwards, so no later compilation points at a deleted directory."""
    saved = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = path
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = saved


def _portable_ttir(ttir: str) -> str:
    """JAX's MLIR prints a CTA barrier in generic form with a location as its properties, which
    Triton's parser rejects; the custom form says the same."""
    return re.sub(r'"gpu\.barrier"\(\) <.*> : \(\) -> \(\)$', "gpu.barrier", ttir, flags=re.M)


def compile_kernel_artifacts(lowered_for_cuda: Any, arch: int = 90, sass: bool = True) -> list[CompiledKernel]:
    """Compiles every Triton kernel in a program lowered for ``cuda`` to a cubin for ``sm_{arch}``;
    with ``sass``, also disassembles it (``nvdisasm -c``) and reads ``cuobjdump -res-usage``."""
    with tempfile.TemporaryDirectory(prefix="fusec-triton-") as tmp, scoped_cache_dir(os.path.join(tmp, "cache")):
        import triton
        from triton.backends.compiler import GPUTarget

        results = []
        for i, (ttir, launch) in enumerate(triton_kernels_in(lowered_for_cuda)):
            match = re.search(r"tt\.func (?:public )?@([\w$.]+)", ttir)
            name = match.group(1) if match else f"kernel{i}"
            path = os.path.join(tmp, f"k{i}.ttir")
            with open(path, "w") as f:
                f.write(_portable_ttir(ttir))
            # FMA contraction on, as XLA's GPU backend does (and said explicitly: triton warns otherwise).
            options = {"num_warps": launch["num_warps"], "num_stages": launch["num_stages"], "enable_fp_fusion": True}
            compiled = triton.compile(path, target=GPUTarget("cuda", arch, 32), options=options)
            results.append(finish_compiled(compiled, name, arch, launch, os.path.join(tmp, f"k{i}"), sass))
        return results


def finish_compiled(compiled: Any, name: str, arch: int, launch: dict[str, Any], stem: str,
                    sass: bool = True) -> CompiledKernel:
    """A kernel ``triton.compile`` compiled for ``sm_{arch}``, with what ptxas reports about it
    (and, with ``sass``, its ``nvdisasm -c`` listing and static shared memory); ``launch`` holds
    its ``num_warps``, ``num_stages`` and ``grid``; files go to ``stem``.*."""
    from fusec.runtime.sass import parse_resource_usage

    ptx_path = stem + ".ptx"
    with open(ptx_path, "w") as f:
        f.write(compiled.asm["ptx"])
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    report = subprocess.run([_ptxas(), "-v", f"--gpu-name={gpu}", ptx_path, "-o", ptx_path + ".o"],
                            capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", report)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    cubin = compiled.asm["cubin"]
    resources = KernelResources(name, arch, int(regs.group(1)) if regs else 0,
                                int(spill.group(1)) if spill else 0, int(spill.group(2)) if spill else 0,
                                len(cubin))
    text, static = "", 0
    if sass:
        cubin_path = stem + ".cubin"
        with open(cubin_path, "wb") as f:
            f.write(cubin)
        nvdisasm, cuobjdump = tool("nvdisasm"), tool("cuobjdump")
        text = _run([nvdisasm, "-c", cubin_path]) if nvdisasm else ""
        if cuobjdump:
            usage = parse_resource_usage(_run([cuobjdump, "-res-usage", cubin_path]))
            static = usage[name].shared if name in usage else 0
    grid = tuple(launch.get("grid", (1, 1, 1))) + (1, 1, 1)
    return CompiledKernel(resources, launch["num_warps"], launch["num_stages"], (grid[0], grid[1], grid[2]),
                          int(compiled.metadata.shared), static, cubin, text)


def compile_kernels(lowered_for_cuda: Any, arch: int = 90) -> list[KernelResources]:
    """Compiles every Triton kernel in a program lowered for ``cuda`` to a cubin for ``sm_{arch}``."""
    return [k.resources for k in compile_kernel_artifacts(lowered_for_cuda, arch, sass=False)]
