"""Turns a generated kernel's source into a Triton function, for the interpreter or for a GPU."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any

from fusec.codegen.triton.kernel import INTERPRETED_FLAG, TritonKernel


def _source_dir() -> Path:
    # Triton reads a kernel's source back with ``inspect``, so generated modules live in real files.
    root = Path(os.environ.get("FUSEC_TRITON_SOURCE_DIR", Path(tempfile.gettempdir()) / "fusec-triton-src"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@functools.lru_cache(maxsize=1024)
def _load(source: str, name: str, interpret: bool) -> Any:
    import triton

    if interpret:
        source = source.replace(INTERPRETED_FLAG, INTERPRETED_FLAG.replace("False", "True"), 1)
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    module_name = f"fusec_triton_{digest}_{'interp' if interpret else 'gpu'}"
    path = _source_dir() / f"{module_name}.py"
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        os.replace(tmp, path)  # atomic: concurrent processes never read half a file
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # ``triton.jit`` decides at decoration time whether it builds an interpreted function; set the
    # knob only while this module executes so nothing else in the process changes mode.
    saved = triton.knobs.runtime.interpret
    triton.knobs.runtime.interpret = interpret
    try:
        spec.loader.exec_module(module)
    finally:
        triton.knobs.runtime.interpret = saved
    return getattr(module, name)


def jit_function(kernel: TritonKernel, *, interpret: bool) -> Any:
    """The kernel's ``@triton.jit`` function: an interpreted one (runs on NumPy-backed arrays on a
    CPU) or a GPU one (for ``jax_triton.triton_call`` and ``triton.compile``)."""
    return _load(kernel.source, kernel.name, interpret)
