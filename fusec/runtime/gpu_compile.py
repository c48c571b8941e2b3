"""Compiling fusec's kernels all the way to GPU machine code on any machine, GPU or not.

The Pallas Triton lowering embeds each kernel's Triton IR in the lowered program; the ``triton``
package compiles it to PTX and a cubin for a chosen NVIDIA architecture, and ptxas reports the
registers and spills of each kernel.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
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


def _ptxas() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")


def compile_kernels(lowered_for_cuda: Any, arch: int = 90) -> list[KernelResources]:
    """Compiles every Triton kernel in a program lowered for ``cuda`` to a cubin for ``sm_{arch}``."""
    with tempfile.TemporaryDirectory(prefix="fusec-triton-") as tmp:
        # triton writes a cache; keep it out of the user's home directory.
        os.environ["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")
        import triton
        from triton.backends.compiler import GPUTarget

        results = []
        for i, (ttir, launch) in enumerate(triton_kernels_in(lowered_for_cuda)):
            match = re.search(r"tt\.func (?:public )?@([\w$.]+)", ttir)
            name = match.group(1) if match else f"kernel{i}"
            path = os.path.join(tmp, f"k{i}.ttir")
            with open(path, "w") as f:
                f.write(ttir)
            # FMA contraction on, as XLA's GPU backend does (and said explicitly: triton warns otherwise).
            options = launch | {"enable_fp_fusion": True}
            compiled = triton.compile(path, target=GPUTarget("cuda", arch, 32), options=options)
            ptx_path = os.path.join(tmp, f"k{i}.ptx")
            with open(ptx_path, "w") as f:
                f.write(compiled.asm["ptx"])
            gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
            report = subprocess.run([_ptxas(), "-v", f"--gpu-name={gpu}", ptx_path, "-o", ptx_path + ".o"],
                                    capture_output=True, text=True, check=True).stderr
            regs = re.search(r"Used (\d+) registers", report)
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
            results.append(KernelResources(name, arch, int(regs.group(1)) if regs else 0,
                                           int(spill.group(1)) if spill else 0, int(spill.group(2)) if spill else 0,
                                           len(compiled.asm["cubin"])))
        return results
