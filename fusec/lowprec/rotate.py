"""Exact input transforms of quantized matrices, in NumPy: a weight W [K, N] (K contracted) is
stored as W = T . deq(Q) with T = diag(scale) . R [K, K]: R = diag(signs_K) . B, B block-diagonal
with orthonormal (Sylvester) Hadamard blocks of size ``block`` and signs_K a fixed pseudo-random
+-1 vector of K (``rotation_signs``: nothing to store), or R = I when ``block`` is 0; ``scale`` a
per-input-channel vector (AWQ's 1/s) or absent.

Then x @ W = (x T) @ deq(Q): the fused kernels run unchanged on deq(Q) and x T costs a
multiply, a reshape and one [b, b] matmul on x. Quantizing T^-1 W instead of W spreads outliers
across each block (rotation) or gives salient input channels more of the grid (AWQ); GPTQ then
sees the inputs x T, whose Hessian is T^T H T.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import numpy as np


@functools.lru_cache(maxsize=16)
def hadamard(block: int) -> np.ndarray:
    """The orthonormal Sylvester Hadamard matrix [block, block] (float64; symmetric, its own
    inverse). Raises ValueError unless ``block`` is a power of two."""
    if not isinstance(block, int) or block < 1 or block & (block - 1):
        raise ValueError(f"a Hadamard block must be a power of two, got {block!r}")
    h = np.ones((1, 1))
    while h.shape[0] < block:
        h = np.block([[h, h], [h, -h]])
    h = h / np.sqrt(block)
    h.setflags(write=False)
    return h


def check_block(k: int, block: int, what: str = "the weight") -> None:
    """Raises ValueError naming ``what`` unless ``block`` (0: none) is a power of two dividing K."""
    if block == 0:
        return
    if not isinstance(block, int) or block < 0 or block & (block - 1):
        raise ValueError(f"{what}: rotate_block must be a power of two, got {block!r}")
    if k % block:
        raise ValueError(f"{what}: rotate_block {block} does not divide its contracted size {k}")


def random_signs(k: int, seed: int) -> np.ndarray:
    """K random +-1 values (float32), the same for the same seed."""
    return np.where(np.random.default_rng(seed).random(k) < 0.5, -1.0, 1.0).astype(np.float32)


def rotation_signs(k: int) -> np.ndarray:
    """The fixed random signs of every K-row rotation (seeded by K alone, so they need no storage
    and matrices reading the same inputs share them)."""
    return random_signs(k, zlib.crc32(f"hadamard{k}".encode()))


def _blocks(w: np.ndarray, block: int) -> np.ndarray:
    """B @ w for w [K, N]: each block of ``block`` rows times the Hadamard matrix."""
    if block == 0:
        return w
    k = w.shape[0]
    return np.einsum("ij,gjn->gin", hadamard(block), w.reshape(k // block, block, -1)).reshape(w.shape)


@dataclass(frozen=True)
class InputTransform:
    """T = diag(scale) . diag(signs_K) . B(block) (no signs, no B when ``block`` is 0), as a
    ``QuantizedArray`` stores it."""

    block: int = 0
    scale: np.ndarray | None = None

    @property
    def is_identity(self) -> bool:
        return self.block == 0 and self.scale is None

    def _scale(self, k: int) -> np.ndarray:
        """The diagonal before B: scale times the rotation's signs."""
        v = np.ones(k) if self.scale is None else np.asarray(self.scale, np.float64)
        return v * rotation_signs(k) if self.block else v

    def apply(self, w: np.ndarray) -> np.ndarray:
        """T @ w (w [K, N], float64): the weight the stored one stands for."""
        return _blocks(np.asarray(w, np.float64), self.block) * self._scale(w.shape[0])[:, None]

    def inverse(self, w: np.ndarray) -> np.ndarray:
        """T^-1 @ w: what is quantized so that T . deq(Q) stands for ``w``."""
        return _blocks(np.asarray(w, np.float64) / self._scale(w.shape[0])[:, None], self.block)

    def inputs(self, x: np.ndarray) -> np.ndarray:
        """x @ T (x [M, K])."""
        x = np.asarray(x, np.float64)
        return _blocks((x * self._scale(x.shape[1])).T, self.block).T

    def hessian(self, h: np.ndarray) -> np.ndarray:
        """T^T H T = B diag(v) H diag(v) B (v: scale times signs): the Hessian of the transformed inputs x T."""
        s = self._scale(h.shape[0])
        h1 = np.asarray(h, np.float64) * s[:, None] * s[None, :]
        return _blocks(_blocks(h1, self.block).T, self.block).T

    def matrix(self, k: int) -> np.ndarray:
        """T itself [K, K] (for tests and small checks)."""
        return self.apply(np.eye(k))
