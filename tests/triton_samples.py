"""Hand-written Triton kernels in fusec's TritonKernel form, with NumPy references: what the GPU
path (jax-triton call, cuda lowering, cubins) is tested on independently of the code generator."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fusec.codegen.triton.kernel import ArraySig, TritonKernel

_HEADER = "import triton\nimport triton.language as tl\n\n\n"

# out = x + y over N=1000 elements in blocks of 256: the last block overhangs and is masked.
VECTOR_ADD = TritonKernel(
    name="vector_add",
    source=_HEADER + """@triton.jit
def vector_add(x_ptr, y_ptr, o_ptr, N: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)
    tl.store(o_ptr + offs, x + y, mask=mask)
""",
    grid=(4,),
    inputs=(ArraySig((1000,), "float32"), ArraySig((1000,), "float32")),
    outputs=(ArraySig((1000,), "float32"),),
    constexprs=(("N", 1000), ("BLOCK", 256)),
)

# out = x * 2 + 1 over a 37x100 array in 16x64 tiles on a 3x2 grid: both axes overhang.
TILE_2D = TritonKernel(
    name="tile_2d",
    source=_HEADER + """@triton.jit
def tile_2d(x_ptr, o_ptr, M: tl.constexpr, N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(o_ptr + offs, x * 2.0 + 1.0, mask=mask)
""",
    grid=(3, 2),
    inputs=(ArraySig((37, 100), "float32"),),
    outputs=(ArraySig((37, 100), "float32"),),
    constexprs=(("M", 37), ("N", 100), ("BM", 16), ("BN", 64)),
    num_warps=4,
    num_stages=1,
)

# Column sums of a 300x48 array: each of 3 row-block programs adds its partial sums into the
# zeroed output with atomics (split-K style), plus a plain per-row copy as a second output.
COLUMN_SUMS = TritonKernel(
    name="column_sums",
    source=_HEADER + """@triton.jit
def column_sums(x_ptr, sums_ptr, copy_ptr, M: tl.constexpr, N: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BN)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(copy_ptr + offs, x, mask=mask)
    tl.atomic_add(sums_ptr + cols, tl.sum(x, axis=0), mask=cols < N)
""",
    grid=(3,),
    inputs=(ArraySig((300, 48), "float32"),),
    outputs=(ArraySig((48,), "float32"), ArraySig((300, 48), "float32")),
    constexprs=(("M", 300), ("N", 48), ("BM", 128), ("BN", 64)),
    zeroed_outputs=(0,),
)


@dataclass(frozen=True)
class Sample:
    kernel: TritonKernel
    reference: Callable[..., list[np.ndarray]]

    def inputs(self, seed: int = 0) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [rng.standard_normal(s.shape).astype(s.dtype) for s in self.kernel.inputs]


SAMPLES = {
    "vector_add": Sample(VECTOR_ADD, lambda x, y: [x + y]),
    "tile_2d": Sample(TILE_2D, lambda x: [x * 2.0 + 1.0]),
    "column_sums": Sample(COLUMN_SUMS, lambda x: [x.sum(axis=0), x]),
}
