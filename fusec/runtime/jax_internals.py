"""The one place fusec touches JAX internals, each use guarded so a JAX upgrade degrades gracefully."""

from __future__ import annotations

from typing import Any

try:  # jax 0.10 / 0.11
    from jax._src.lax.lax import _convert_element_type as _convert_with_weak_type
except ImportError:  # pragma: no cover - a JAX release without it
    _convert_with_weak_type = None


def make_weak(x: Any) -> Any:
    """``x`` marked weakly typed, as JAX marks results computed only from Python scalars.

    fusec's IR spells dtypes out, so its results are strongly typed; outputs that ``jax.jit`` would
    return weakly typed get the mark back here, so they promote the same way afterwards.
    """
    if _convert_with_weak_type is None:
        return x
    return _convert_with_weak_type(x, weak_type=True)


def triton_kernels_in(lowered: Any) -> list[tuple[str, dict[str, Any]]]:
    """The Triton IR text (TTIR) and launch parameters of every Pallas-Triton kernel in a program
    lowered for ``cuda``: [(ttir_text, {"num_warps": .., "num_stages": .., "grid": (x, y, z)})]."""
    from jax._src.lib import triton as jax_triton_dialect
    from jax._src.lib.mlir import ir

    calls: list[Any] = []

    def walk(op: Any) -> None:
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    if inner.operation.name == "stablehlo.custom_call" and \
                            "__gpu$xla.gpu.triton" in str(inner.attributes["call_target_name"]):
                        calls.append(inner)
                    walk(inner)

    walk(lowered.compiler_ir("stablehlo").operation)
    out = []
    for call in calls:
        config = call.attributes["mhlo.backend_config"]
        with ir.Context() as ctx:
            jax_triton_dialect.dialect.register_dialect(ctx)
            ctx.allow_unregistered_dialects = True
            ttir = ir.Module.parse(config["ir"].value_bytes).operation.get_asm(enable_debug_info=False)
        grid = tuple(int(config[f"grid_{axis}"].value) if f"grid_{axis}" in config else 1 for axis in "xyz")
        out.append((ttir, {"num_warps": int(config["num_warps"].value), "num_stages": int(config["num_stages"].value),
                           "grid": grid}))
    return out
