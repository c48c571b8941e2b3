"""NumPy stand-ins for the ``libdevice`` functions generated kernels call, for the Triton
interpreter (which runs ``tl`` functions on NumPy but has no libdevice). Each computes in float32
(float64 for float64 tiles) and returns a tile of its input's dtype."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np

_UNARY: dict[str, Callable[[Any], Any]] = {
    "tanh": np.tanh, "log1p": np.log1p, "expm1": np.expm1, "tan": np.tan, "asin": np.arcsin, "acos": np.arccos,
    "atan": np.arctan, "sinh": np.sinh, "cosh": np.cosh, "asinh": np.arcsinh, "acosh": np.arccosh,
    "atanh": np.arctanh, "rsqrt": lambda x: 1 / np.sqrt(x), "cbrt": np.cbrt, "round": lambda x: _round(x),
    "erfc": np.vectorize(math.erfc, otypes=[np.float64]), "lgamma": np.vectorize(math.lgamma, otypes=[np.float64]),
    "erfinv": None,  # filled below (a float64 Newton iteration on erf)
}
def _round(x: Any) -> Any:
    """Half away from zero, as libdevice's round (NumPy's rounds half to even)."""
    return np.where(np.abs(x - np.trunc(x)) >= 0.5, np.trunc(x) + np.sign(x), np.trunc(x))


_BINARY: dict[str, Callable[[Any, Any], Any]] = {"pow": np.power, "atan2": np.arctan2, "fmod": np.fmod,
                                                 "nextafter": np.nextafter}


def _erfinv(y: Any) -> Any:
    y = np.asarray(y, np.float64)
    erf = np.vectorize(math.erf, otypes=[np.float64])
    # Giles's single-precision approximation as the start, two Newton steps on erf(x) = y.
    w = -np.log(np.maximum((1.0 - y) * (1.0 + y), 1e-300))
    x = np.where(w < 5, _poly(w - 2.5, _GILES_SMALL), _poly(np.sqrt(w) - 3.0, _GILES_LARGE)) * y
    with np.errstate(all="ignore"):
        for _ in range(2):
            x = x - (erf(x) - y) / (2 / np.sqrt(np.pi) * np.exp(-x * x))
    return np.where(np.abs(y) == 1, np.copysign(np.inf, y), np.where(np.abs(y) > 1, np.nan, x))


_GILES_SMALL = (2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087, -0.00125372503,
                -0.00417768164, 0.246640727, 1.50140941)
_GILES_LARGE = (-0.000200214257, 0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773, -0.0076224613,
                0.00943887047, 1.00167406, 2.83297682)


def _poly(x: Any, coefs: tuple[float, ...]) -> Any:
    p = np.full_like(x, coefs[0])
    for c in coefs[1:]:
        p = p * x + c
    return p


_UNARY["erfinv"] = _erfinv


def _wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    def apply(*xs: Any) -> Any:
        import triton.language as tl
        from triton.runtime.interpreter import TensorHandle

        first = next(x for x in xs if isinstance(x, tl.tensor))
        dtype = first.handle.data.dtype
        wide = np.float64 if dtype == np.float64 else np.float32
        args = [np.asarray(x.handle.data if isinstance(x, tl.tensor) else x).astype(wide) for x in xs]
        with np.errstate(all="ignore"):
            out = np.asarray(fn(*args)).astype(wide).astype(dtype)
        return tl.tensor(TensorHandle(out, first.handle.dtype.scalar), first.type)
    return apply


LIBDEVICE = SimpleNamespace(**{name: _wrap(fn) for name, fn in {**_UNARY, **_BINARY}.items()})
