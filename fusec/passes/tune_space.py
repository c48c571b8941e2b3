"""The tunable knobs of a GPU matmul kernel's tiling, the legal values for given shapes, and the
kernel's tiling with a chosen config applied (the autotuner's search space; no JAX here).

A :class:`TileConfig` names a matmul's row and column blocks, K step, split-K factor and launch
parameters. :func:`check_config` is what keeps a tuned config from ever giving a wrong answer: a
config read back from a cache file is checked against the kernel's own facts before it is used.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, fields

from fusec.ir import Function, KernelTiling, Op, print_function
from fusec.ir.tiling import cdiv
from fusec.passes.target import PALLAS_TRITON


def pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True)
class GemvConfig:
    """Split-K GEMV tiling: the K step (at most one scale group), pipeline stages, and the
    programs aimed for (``programs_per_sm`` x ``sms``: enough resident CTAs per SM to keep the
    loads in flight that Little's law asks for, docs/gpu-model.md)."""

    bk: int = 128
    num_stages: int = 3
    num_warps: int = 4
    programs_per_sm: int = 4
    sms: int = 132
    fma_rows: int = 1  # at most this many rows multiply on the FMA units (more lose to the padded dot)
    fma_cube: int = 16384  # elements of that product tile (128 per thread at 4 warps: no spills)
    min_trips: int = 2  # K steps each program keeps (one step per program pipelines nothing)


GEMV = GemvConfig()


@dataclass(frozen=True)
class TilingFacts:
    """What tiling needs to know of one kernel op (see ``choose_tiling``'s arguments)."""

    kind: str
    space: tuple[int, ...]
    k: int | None = None
    packed: bool = False
    table_bits: int = 0
    reduce_axes: tuple[int, ...] | None = None
    splittable: bool = False
    group: int | None = None
    fma_ok: bool = False
    pair_lanes: int = 0  # codes per word of a weight unpack_pair decodes (0: it cannot)

    @property
    def tunable(self) -> bool:
        return self.kind == "matmul" and self.k is not None and len(self.space) >= 2


_LABEL = re.compile(r"m(\d+)n(\d+)k(\d+)s(\d+)w(\d+)p(\d+)")


@dataclass(frozen=True)
class TileConfig:
    """A matmul kernel's tunable tiling: ``block_m`` x ``block_n`` output tiles, K steps of ``bk``,
    the K loop split over ``split`` programs, ``num_warps`` warps and ``num_stages`` stages."""

    block_m: int
    block_n: int
    bk: int
    split: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if type(v) is not int or v < 1:
                raise ValueError(f"TileConfig.{f.name} must be a positive int, got {v!r}")

    @property
    def label(self) -> str:
        """Short text form, e.g. ``m16n128k128s4w4p3`` (the ``tile`` pass's ``config`` option)."""
        return (f"m{self.block_m}n{self.block_n}k{self.bk}s{self.split}w{self.num_warps}"
                f"p{self.num_stages}")

    @staticmethod
    def parse(text: str) -> TileConfig:
        m = _LABEL.fullmatch(text.strip())
        if m is None:
            raise ValueError(f"tile config {text!r} is not of the form m<rows>n<cols>k<K step>s<split>"
                             "w<warps>p<stages>, e.g. m16n128k128s4w4p3")
        return TileConfig(*(int(g) for g in m.groups()))

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @staticmethod
    def from_dict(data: object) -> TileConfig:
        """The config a JSON object spells; ValueError unless it has exactly this class's fields."""
        names = {f.name for f in fields(TileConfig)}
        if not isinstance(data, dict) or set(data) != names:
            raise ValueError(f"a tile config is an object with the keys {sorted(names)}, got {data!r}")
        return TileConfig(**data)


def config_of(tiling: KernelTiling) -> TileConfig:
    """The config a (matmul) tiling has."""
    return TileConfig(tiling.block[-2], tiling.block[-1], int(tiling.bk or 1), tiling.split,
                      tiling.num_warps, tiling.num_stages)


def _pow2(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


def fma_rows_ok(facts: TilingFacts, block_m: int) -> bool:
    """Whether rows blocks of ``block_m`` (< the smallest dot tile) may multiply on the FMA units:
    a splittable f32-decoding low-bit GEMV whose rows fit one block."""
    return facts.packed and facts.splittable and facts.fma_ok and block_m == pow2_at_least(facts.space[-2])


def check_config(facts: TilingFacts, config: TileConfig) -> None:
    """Raises ValueError, naming the field, unless ``config`` gives a correct kernel for ``facts``."""
    if not facts.tunable:
        raise ValueError(f"a {facts.kind} kernel has no tunable tile config (only matmuls do)")
    assert facts.k is not None
    low = PALLAS_TRITON.min_dot_tile
    for name in ("block_m", "block_n", "bk", "split", "num_warps"):
        if not _pow2(getattr(config, name)):
            raise ValueError(f"tile config {config.label}: {name} = {getattr(config, name)} is not a power of two")
    if config.block_m < low and not fma_rows_ok(facts, config.block_m):
        raise ValueError(f"tile config {config.label}: block_m = {config.block_m} is below the smallest dot tile "
                         f"({low}); only a split-K GEMV decoding to f32 with its rows in one block may do that")
    if config.block_m > 256 or config.block_n > 512 or config.bk > 1024:
        raise ValueError(f"tile config {config.label}: blocks at most 256 x 512 with K steps of at most 1024")
    if config.block_n < low:
        raise ValueError(f"tile config {config.label}: block_n = {config.block_n} is below {low}")
    if config.num_warps > 16 or config.num_stages > 8:
        raise ValueError(f"tile config {config.label}: num_warps at most 16 and num_stages at most 8")
    if facts.packed:
        group = facts.group or facts.k
        if config.bk < 32 or (group < facts.k and group % config.bk):
            raise ValueError(f"tile config {config.label}: bk = {config.bk} must be a multiple of 32 (a word of "
                             f"codes) dividing the scale group of {group} rows")
        if facts.table_bits > 4 and config.bk > 32:
            raise ValueError(f"tile config {config.label}: bk = {config.bk}: formats decoded by select chains "
                             "wider than 4 bits keep K steps of 32 (wider ones spill)")
    elif config.bk < low:
        raise ValueError(f"tile config {config.label}: bk = {config.bk} is below the smallest dot tile ({low})")
    if config.split > 1:
        if not (facts.packed and facts.splittable):
            raise ValueError(f"tile config {config.label}: split = {config.split}, but only a low-bit matmul that "
                             "is its K reduction alone (split-epilogue's form) splits its K loop")
        steps = cdiv(facts.k, config.bk)
        if steps % config.split:
            raise ValueError(f"tile config {config.label}: split = {config.split} does not divide the {steps} "
                             f"K steps of {config.bk}")


def strategy_of(facts: TilingFacts, config: TileConfig) -> str | None:
    """The matmul strategy a config gives (as ``choose_tiling`` picks it for its defaults)."""
    if not facts.packed:
        return None
    low = PALLAS_TRITON.min_dot_tile
    if config.block_m < low:
        return "gemv-fma"
    gemv = facts.space[-2] <= 16
    if gemv and facts.splittable and facts.pair_lanes and 2 * config.bk // facts.pair_lanes >= low:
        return "gemv-pairs"  # two codes per decode; its K steps hold at least 8 words' rows
    return "gemv" if gemv else "gemm"


def apply_config(facts: TilingFacts, config: TileConfig) -> KernelTiling:
    """The GPU tiling of a matmul with ``config`` (checked first)."""
    check_config(facts, config)
    r = len(facts.space)
    block = (1,) * (r - 2) + (config.block_m, config.block_n)
    squeeze = tuple(d for d in range(r - 2) if d not in (facts.reduce_axes or ()))
    return KernelTiling("matmul", facts.space, block, tuple(cdiv(s, b) for s, b in zip(facts.space, block)),
                        squeeze, config.bk, config.num_warps, config.num_stages, strategy_of(facts, config),
                        config.split)


def _splits(facts: TilingFacts, bk: int, programs: int) -> list[int]:
    """Split-K factors that bring ``programs`` output tiles up to 2, 4 or 8 programs per SM."""
    assert facts.k is not None
    if not (facts.packed and facts.splittable):
        return [1]
    steps = cdiv(facts.k, bk)
    out = []
    for per_sm in (2, 4, 8):
        split = 1
        while programs * split < per_sm * GEMV.sms and steps % (split * 2) == 0 and \
                steps // (split * 2) >= GEMV.min_trips:
            split *= 2
        out.append(split)
    return sorted(set(out))


def candidates(facts: TilingFacts, default: TileConfig, limit: int = 16) -> list[TileConfig]:
    """Legal configs for the kernel, ``default`` first, then the others nearest to it (fewest
    changed fields), at most ``limit`` in all."""
    assert facts.k is not None
    m, n, k = facts.space[-2], facts.space[-1], facts.k
    low = PALLAS_TRITON.min_dot_tile
    gemv = facts.packed and m <= 16
    ns = [b for b in (32, 64, 128, 256, *((512,) if gemv else ())) if b <= max(low, pow2_at_least(n))]
    if facts.packed:
        bks = [b for b in (32, 64, 128, 256) if b <= max(32, pow2_at_least(k))]
    else:
        bks = [b for b in (16, 32, 64) if b <= max(low, pow2_at_least(k))]
    if gemv:  # GEMV: rows in one block (FMA rows when the default has them)
        ms = [default.block_m]
        stages, warps = (3, 4), (4, 8)
    else:
        ms = [b for b in (16, 32, 64, 128) if b <= max(low, pow2_at_least(m))]
        stages, warps = (2, 3), (4, 8)
    found: list[TileConfig] = []
    for bm in ms:
        for bn in ns:
            for bk in bks:
                programs = cdiv(m, bm) * cdiv(n, bn) * (_prod(facts.space[:-2]))
                for split in _splits(facts, bk, programs):
                    for w in warps:
                        for p in stages:
                            c = TileConfig(bm, bn, bk, split, w, p)
                            try:
                                check_config(facts, c)
                            except ValueError:
                                continue
                            if c.block_m < low and c.block_m * c.bk * c.block_n > 2 * GEMV.fma_cube:
                                continue  # the FMA product tile would spill
                            found.append(c)
    distance = lambda c: sum(getattr(c, f.name) != getattr(default, f.name) for f in fields(c))  # noqa: E731
    ranked = sorted(set(found) - {default}, key=lambda c: (distance(c), c.label))
    return [default, *ranked][:limit]


def _prod(xs: tuple[int, ...]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def canonical_kernel_text(op: Op, funcs: list[Function], skip: tuple[str, ...] = ("callee", "tile"),
                          operand_types: bool = True) -> str:
    """The kernel op (attributes but ``skip``, and its operand and result types) and ``funcs`` printed
    with names taken out (functions renamed by position, values by first appearance): equal texts run
    the same code on the same types."""
    attrs = sorted((k, v) for k, v in op.attr_dict.items() if k not in skip)
    values = (*op.operands, *op.results) if operand_types else ()
    text = "\n".join(print_function(f) for f in funcs) + f"\n{attrs!r}\n" + ", ".join(str(v.type) for v in values)
    renamed = {f.name: f"F{i}" for i, f in enumerate(funcs)}
    # Whole names only: @name in a function's header, "name" in a loop's body attribute.
    text = re.sub(r'(@|")([\w.$]+)', lambda m: m.group(1) + renamed.get(m.group(2), m.group(2)), text)
    values: dict[str, str] = {}
    return re.sub(r"%[\w.$]+", lambda m: values.setdefault(m.group(0), f"%v{len(values)}"), text)


# Tiling's attributes (and the config source it adds) stay out of the tuning fingerprint, and so do
# what fold-views changes after tiling (the operands' views and bytes): tiling and codegen agree on it.
_UNTUNED_SKIP = ("callee", "tile", "block", "grid", "squeeze", "bk", "num_warps", "num_stages", "strategy",
                 "split", "tuned", "in_views", "out_views", "bytes_read", "bytes_written")


def tuning_fingerprint(op: Op, functions: dict[str, Function]) -> str:
    """A short hash of the kernel as fusion made it (its callee, kind and space), whatever its tiling
    or views: the cache key's kernel part."""
    text = canonical_kernel_text(op, [functions[str(op.attr("callee"))]], _UNTUNED_SKIP, operand_types=False)
    return hashlib.sha256(text.encode()).hexdigest()[:24]
