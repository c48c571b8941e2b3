"""Layout and tiling: for each kernel op, the block of its iteration space each program instance
computes, the grid, which dimensions are squeezed out of the block, and launch parameters.

Blocks are powers of two, as the Triton lowering requires of every array value; a dimension that
the block does not divide is covered by a partial last block, masked in the kernel where it
matters (reductions, the matmul's K loop). ``target="interpret"`` picks one big block (Pallas's
interpreter costs about grid steps x whole array on a CPU); ``target="gpu"`` picks GPU-sized tiles.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from fusec.ir import Function, KernelTiling, LowBitType, Module, Op, parse_elem_type, tile_ops
from fusec.ir.tile_ops import pair_format_ok
from fusec.ir.tiling import TILING_ATTRS, cdiv
from fusec.passes.base import Pass, register_pass
from fusec.passes.split_epilogue import cast_epilogue
from fusec.passes.target import PALLAS_TRITON
from fusec.passes.tune_cache import kernel_key, lookup
from fusec.passes.tune_space import (
    GEMV,
    GemvConfig,
    TileConfig,
    TilingFacts,
    apply_config,
    check_config,
    pow2_at_least,
    tuning_fingerprint,
)

__all__ = ["GEMV", "GemvConfig", "Tile", "choose_tiling", "default_tiling", "kernel_facts", "pow2_at_least",
           "tile_kernel_op", "tuned_config"]


def _dot_k(kernel_func: Function) -> int:
    dot = next(op for op in kernel_func.ops if op.opcode == "dot")
    lhs = dot.operands[0].type
    return lhs.shape[-2] if dot.attr("lhs_t") else lhs.shape[-1]


def choose_tiling(kind: str, space: tuple[int, ...], k: int | None, target: str, packed: bool = False,
                  table_bits: int = 0, reduce_axes: tuple[int, ...] | None = None, splittable: bool = False,
                  group: int | None = None, fma_ok: bool = False, pair_lanes: int = 0) -> KernelTiling:
    """Block, grid, squeezed dims, K step and launch parameters for one kernel. ``packed``: the
    matmul unpacks a low-bit weight, whose K step is 32 (a whole word of 1-bit codes, and a divisor
    of every scale group); ``table_bits``: the width of a NormalFloat or lookup-table format it
    decodes with a chain of selects (wide tables get narrower tiles, to keep clear of spills);
    ``splittable``: the kernel is only the K reduction (split-epilogue's form), so its K loop may
    split across programs (split-K), with K steps up to the scale ``group`` (rows per scale);
    ``fma_ok``: it decodes to f32, so a few rows may multiply on the FMA units with the same
    rounding as the reference (a bfloat16 weight would need rounding there and back);
    ``pair_lanes``: the codes per word of a weight ``unpack_pair`` decodes (0: it cannot), which a
    split-K GEMV with K steps of at least 8 words' rows then does (``gemv-pairs``)."""
    r = len(space)
    if target == "interpret":
        block = [pow2_at_least(d) for d in space]
        bk = pow2_at_least(k) if k else None
    elif kind == "matmul":
        low = PALLAS_TRITON.min_dot_tile
        block = [1] * (r - 2) + [min(64, max(low, pow2_at_least(space[-2]))),
                                 min(64, max(low, pow2_at_least(space[-1])))]
        bk = min(32, max(low, pow2_at_least(k or 1)))
    elif kind == "reduction":
        # The reduced axes whole in one block; the rest of a 4096-element budget goes to the
        # innermost other axis (the last axis is the contiguous one).
        axes = reduce_axes if reduce_axes is not None else (r - 1,)
        block = [1] * r
        budget = 4096
        for d in axes:
            block[d] = pow2_at_least(space[d])
            budget //= block[d]
        kept = [d for d in range(r) if d not in axes]
        if kept:
            block[kept[-1]] = min(pow2_at_least(space[kept[-1]]), max(1, budget))
        bk = None
    else:
        block = [1] * r
        block[-1] = min(pow2_at_least(space[-1]), 1024)
        if r >= 2:
            block[-2] = min(pow2_at_least(space[-2]), max(1, 2048 // block[-1]))
        bk = None
    if kind == "matmul":
        block[: r - 2] = [1] * (r - 2)
    launch: dict[str, int] = {}
    if packed:
        bk = 32
        if kind == "matmul" and target == "gpu" and space[-2] <= 16:
            # Skinny (GEMV-like) strategy: few rows, so each program takes a wider slice of the
            # packed weight and the memory system sees longer runs of words.
            block[-1] = min(128 if table_bits <= 4 else 64, max(PALLAS_TRITON.min_dot_tile, pow2_at_least(space[-1])))
            if splittable and k:
                cap = GEMV.bk if table_bits <= 4 else 32  # wide select chains: short K steps, no spills
                if space[-2] <= GEMV.fma_rows and fma_ok:  # FMA units, not a dot padded to 16 rows
                    # The [rows, K step, N] product is one tile: keep it to fma_cube elements.
                    block[-2] = pow2_at_least(space[-2])
                    block[-1] = min(block[-1], max(16, GEMV.fma_cube // (32 * block[-2])))
                    cap = max(32, min(cap, GEMV.fma_cube // (block[-2] * block[-1])))
                bk, launch = _gemv_split(k, min(group or k, cap), cdiv(space[-1], block[-1]) *
                                         cdiv(space[-2], block[-2]), GEMV)
    squeeze = tuple(d for d in range(max(0, r - 2)) if block[d] == 1 and d not in (reduce_axes or ()))
    strategy = ("gemv" if space[-2] <= 16 else "gemm") if packed else None
    if launch and block[-2] < PALLAS_TRITON.min_dot_tile:
        strategy = "gemv-fma"
    elif launch and pair_lanes and bk and 2 * bk // pair_lanes >= PALLAS_TRITON.min_dot_tile:
        strategy = "gemv-pairs"
    return KernelTiling(kind, tuple(space), tuple(block), tuple(cdiv(s, b) for s, b in zip(space, block)), squeeze,
                        bk, strategy=strategy, **launch)




def _gemv_split(k: int, group: int, programs: int, config: GemvConfig = GEMV) -> tuple[int, dict[str, int]]:
    """The K step and launch parameters (with ``split``) of a skinny low-bit matmul of ``programs``
    output tiles: split the K loop into the largest power of two of parts, each a whole number of
    (at least ``min_trips``) K steps, that brings the grid up to the programs aimed for."""
    bk = 32
    while bk * 2 <= min(config.bk, group, pow2_at_least(k)) and group % (bk * 2) == 0:
        bk *= 2
    steps = cdiv(k, bk)
    split = 1
    while programs * split < config.programs_per_sm * config.sms and steps % (split * 2) == 0 and \
            steps // (split * 2) >= config.min_trips:
        split *= 2
    return bk, {"split": split, "num_stages": config.num_stages, "num_warps": config.num_warps}


def attention_tiling(space: tuple[int, ...], tk: int, target: str) -> KernelTiling:
    """An attention kernel over ``(batch, Tq, Dv)`` with ``tk`` keys: one program per batch-head
    and query block, the key/value loop's step in ``bk``. GPU blocks are FlashAttention-2's
    64 x 64 (at least the 16 rows a tensor-core dot needs); the interpreter gets few, large query
    blocks (its cost is grid steps x arrays) and key blocks of 32, so small tests still run the
    online softmax over several steps. Self-attention reads queries and keys with blocks that
    overhang alike (one fused QKV array is masked everywhere or nowhere)."""
    batch, tq, dv = space
    if target == "interpret":
        bq, bk = min(128, pow2_at_least(tq)), min(32, pow2_at_least(tk))
    else:
        low = PALLAS_TRITON.min_dot_tile
        bq, bk = (min(64, max(low, pow2_at_least(n))) for n in (tq, tk))
    block = (1, bq, pow2_at_least(dv))
    return KernelTiling("attention", tuple(space), block, tuple(cdiv(s, b) for s, b in zip(space, block)), (0,), bk)


def backward_tiling(space: tuple[int, ...], steps: int, target: str) -> KernelTiling:
    """A backward part over ``(batch, T, D)``, looping over ``steps`` (0: no loop) rows of the
    other sequence: parallel blocks of 64 rows on a GPU; for the interpreter few, large parallel
    blocks and loop steps of 32."""
    batch, t, d = space
    if target == "interpret":
        bp, bs = min(128, pow2_at_least(t)), min(32, pow2_at_least(max(steps, 1)))
    else:
        bp, bs = (min(64, max(16, pow2_at_least(n))) for n in (t, max(steps, 1)))
    block = (1, bp, pow2_at_least(d))
    if target != "interpret" and steps and block[2] >= 64:
        # Heads of 64 and more: loop steps of 32 rows and eight warps keep the two accumulators and
        # the four score-sized tiles in registers (64-row steps, or four warps, spill on sm_90).
        bs, warps = min(bs, 32), 8
    else:
        warps = 4
    return KernelTiling("attention_bwd", tuple(space), block, tuple(cdiv(s, b) for s, b in zip(space, block)), (0,),
                        bs if steps else None, num_warps=warps)


def kernel_facts(op: Op, functions: dict[str, Function]) -> TilingFacts:
    """What tiling reads of a kernel op and its callee."""
    kind, space = str(op.attr("kind")), tuple(op.attr("space"))
    callee = functions[str(op.attr("callee"))]
    k = _dot_k(callee) if kind == "matmul" else None
    formats = [parse_elem_type(str(o.attr("format"))) for o in callee.ops if o.opcode == "dequantize"]
    table_bits = max((f.bits for f in formats if getattr(f, "family", "") in ("nf", "lut")), default=0)
    reduce_axes = tuple(op.attr("reduce_axes")) if op.attr("reduce_axes") is not None else None
    dots = [o for o in callee.ops if o.opcode == "dot"]
    # Only the f32 K reduction, or it and a cast (split-epilogue's forms): the K loop may split.
    reduction = len(dots) == 1 and ((callee.returns == (dots[0].result,) and str(dots[0].result.type.elem) == "f32")
                                    or cast_epilogue(callee) is not None)
    splittable = len(formats) == 1 and reduction and not op.attr("in_views") and not op.attr("out_views")
    group = None
    if formats and k:
        weight = next(o for o in callee.ops if o.opcode == "dequantize").operands[0]
        group = weight.type.elem.rows_per_scale(weight.type.shape[0])  # type: ignore[union-attr]
    fma_ok = any(str(o.result.type.elem) == "f32" for o in callee.ops if o.opcode == "dequantize")
    pair_lanes = 0
    if splittable and len(formats) == 1:
        dq = next(o for o in callee.ops if o.opcode == "dequantize")
        dtype = str(dq.result.type.elem)
        plain = not dots[0].attr("lhs_t") and not dots[0].attr("rhs_t") and dots[0].operands[1].name == dq.result.name
        if plain and str(dots[0].operands[0].type.elem) == dtype and pair_format_ok(formats[0], dtype) and \
                _table_fits(formats[0], dq.attr("lut"), dtype):
            pair_lanes = tile_ops.pair_lanes(formats[0])  # type: ignore[arg-type]
    return TilingFacts(kind, space, k, bool(formats), table_bits, reduce_axes, splittable, group, fma_ok, pair_lanes)


# The largest finite 16-bit floats: a paired table decode holds the table's values in one.
_MAX_16 = {"bf16": 3.3895313892515355e38, "f16": 65504.0}


def _table_fits(fmt: object, lut: object, dtype: str) -> bool:
    """Whether a table format's values stay finite in ``dtype`` (a lookup table may hold values
    beyond float16's range that only the scale brings back): other formats always do."""
    # NormalFloat levels lie in [-1, 1]; only a lookup table carries values of its own.
    if not isinstance(fmt, LowBitType) or fmt.family != "lut":
        return True
    values = [abs(float(v)) for v in (lut or ())]  # type: ignore[union-attr]
    return bool(values) and max(values) <= _MAX_16.get(dtype, 0.0)


def default_tiling(f: TilingFacts, target: str) -> KernelTiling:
    """The tiling ``target`` gets without a tuned config."""
    return choose_tiling(f.kind, f.space, f.k, target, f.packed, f.table_bits, f.reduce_axes, f.splittable, f.group,
                         f.fma_ok, f.pair_lanes)


def tile_kernel_op(op: Op, functions: dict[str, Function], target: str, config: TileConfig | None = None,
                   source: str | None = None) -> Op:
    """``op`` (a kernel op) with the tiling attributes ``target`` gets, replacing any it had; with
    ``config`` (a matmul on the ``gpu`` target), that config's tiling (checked: ValueError naming the
    bad field), its ``source`` ("cache:gpu-timed", "shipped:model", "option", ...) kept in the ``tuned``
    attribute."""
    if op.attr("kind") == "decode-combine":
        from fusec.passes.decode_split import combine_tiling
        attrs = {key: v for key, v in op.attr_dict.items() if key not in (*TILING_ATTRS, "tile", "tuned")}
        tiling = combine_tiling(tuple(op.attr("space")))
        return Op(op.opcode, op.operands, op.results, Op.make("kernel", **(attrs | tiling.as_attrs())).attrs, op.loc)
    if op.attr("kind") in ("attention", "attention_bwd"):  # their own tilings (not tuned yet)
        callee = functions[str(op.attr("callee"))]
        tk = next(o for o in callee.ops if o.opcode == "dot").result.type.shape[-1]
        if op.attr("kind") == "attention_bwd":
            tiling = backward_tiling(tuple(op.attr("space")), int(op.attr("steps")), target)
        elif op.attr("decode_split") is not None:
            from fusec.passes.decode_split import decode_tiling
            tiling = decode_tiling(tuple(op.attr("space")), int(op.attr("decode_chunk")), target)
        else:
            tiling = attention_tiling(tuple(op.attr("space")), tk, target)
        attrs = {key: v for key, v in op.attr_dict.items() if key not in (*TILING_ATTRS, "tile", "tuned")}
        return Op(op.opcode, op.operands, op.results, Op.make("kernel", **(attrs | tiling.as_attrs())).attrs, op.loc)
    f = kernel_facts(op, functions)
    if config is not None and target == "gpu":
        tiling = apply_config(f, config)
    else:
        tiling = default_tiling(f, target)
    tuned = {"tuned": source} if config is not None and target == "gpu" and source else {}
    attrs = {key: v for key, v in op.attr_dict.items() if key not in (*TILING_ATTRS, "tile", "tuned")}
    attrs |= tiling.as_attrs() | tuned
    return Op(op.opcode, op.operands, op.results, Op.make("kernel", **attrs).attrs, op.loc)


def tuned_config(op: Op, functions: dict[str, Function], device: str = "") -> tuple[TileConfig, str] | None:
    """The tuned config of a matmul kernel op and its source, the file and how its entry was
    chosen ("cache:gpu-timed", "cache:model", "shipped:model"), or None: the user's cache, then the
    shipped file; a config that does not fit the kernel is skipped (warning)."""
    facts = kernel_facts(op, functions)
    if not facts.tunable:
        return None
    found = lookup(kernel_key(functions[str(op.attr("callee"))], tuning_fingerprint(op, functions), device))
    if found is None:
        return None
    entry, source = found
    try:
        check_config(facts, entry.config)
    except ValueError as e:
        warnings.warn(f"fusec autotune {source} entry for kernel {op.attr('callee')} ignored: {e}", stacklevel=2)
        return None
    return entry.config, f"{source}:{entry.method}"


@register_pass
@dataclass(frozen=True)
class Tile(Pass):
    """Adds block, grid, squeeze, bk, num_warps and num_stages attributes to every kernel op. On the
    ``gpu`` target a matmul takes ``config`` (a :class:`TileConfig` label such as
    ``m16n128k128s4w4p3``; with ``only``, just for the kernel of that tuning fingerprint), else with
    ``tuned`` the autotune cache's or shipped file's config for ``device`` (default: the static
    model's), else the default tiling."""

    name = "tile"
    target: str = "gpu"
    config: str = ""
    only: str = ""
    tuned: bool = True
    device: str = ""

    def run(self, module: Module) -> Module:
        if self.target not in ("gpu", "interpret"):
            raise ValueError(f"tile: target must be 'gpu' or 'interpret', got {self.target!r}")
        forced = TileConfig.parse(self.config) if self.config else None
        functions = {f.name: f for f in module.functions}
        out = []
        for f in module.functions:
            ops = [self._tile(op, functions, forced) if op.opcode == "kernel" else op for op in f.ops]
            out.append(Function(f.name, f.params, tuple(ops), f.returns))
        return module.replace_functions(out)

    def _tile(self, op: Op, functions: dict[str, Function], forced: TileConfig | None) -> Op:
        if self.target != "gpu" or not kernel_facts(op, functions).tunable:
            return tile_kernel_op(op, functions, self.target)
        if forced is not None and (not self.only or tuning_fingerprint(op, functions) == self.only):
            try:
                return tile_kernel_op(op, functions, "gpu", forced, "option")
            except ValueError as e:
                raise ValueError(f"tile: config {forced.label} for kernel {op.attr('callee')}: {e}") from None
        found = tuned_config(op, functions, self.device) if self.tuned else None
        return tile_kernel_op(op, functions, "gpu", *found) if found else tile_kernel_op(op, functions, "gpu")
