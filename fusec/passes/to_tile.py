"""``to-tile``: each tiled kernel's graph-level callee becomes a tile program (fusec/ir/tile_ops.py).

Every decision the kernel's code depends on is made here, once, and written down as IR: which
arrays are loaded whole per block and which stream through the matmul's K loop, the block index of
every access (folded views included), the mask on every dimension whose blocks can overhang their
array (found by the same interval arithmetic the verifier proves bounds with), the accumulators
and their initial values, sibling dots sharing one load of their lhs, where a packed weight is
unpacked, and the padding a partial row's reduction must not see. Codegen only translates.
"""

from __future__ import annotations

from dataclasses import dataclass

from fusec.errors import FusecError
from fusec.ir import Function, KernelTiling, LowBitType, Module, Op, TensorType, Value
from fusec.ir.tile_ops import pair_bias, pair_is_table, pair_lanes
from fusec.ir.types import BOOL, F32, I32, DType
from fusec.passes.base import Pass, register_pass
from fusec.passes.split_epilogue import cast_epilogue
from fusec.passes.tile_builder import SCALAR, ArrayMapping, IndexExpr, TileBuilder, reduction_identity
from fusec.passes.to_tile_fixup import split_k_fixup
from fusec.passes.views import View, value_block_dims, value_space_dims


def _param_roles(func: Function) -> dict[str, str]:
    roles: dict[str, str] = {}
    for dot in (op for op in func.ops if op.opcode == "dot"):
        roles[dot.operands[0].name] = "lhs"
        roles[dot.operands[1].name] = "rhs"
    for dq in (op for op in func.ops if op.opcode == "dequantize"):
        roles.update({v.name: "packed" for v in dq.operands})
    return roles


def _check_fits(v: Value, space: tuple[int, ...], name: str, reduce_axes: tuple[int, ...] | None) -> None:
    shape = v.type.shape
    axes = reduce_axes if reduce_axes is not None else (len(space) - 1,)
    rows = tuple(n for d, n in enumerate(space) if d not in axes)
    if not ((len(shape) == len(space) and all(a in (1, b) for a, b in zip(shape, space))) or shape == rows):
        raise FusecError(f"kernel {name}: {v}: {v.type} has no block in the space {list(space)}")


class _KernelLowering:
    """Lowers one kernel op's callee to its tile program (and the K loop's body)."""

    def __init__(self, op: Op, callee: Function) -> None:
        self.op, self.callee = op, callee
        self.tiling = KernelTiling.from_attrs(op.attr_dict)
        axes = op.attr("reduce_axes")
        self.reduce_axes = tuple(axes) if axes is not None else None
        self.b = TileBuilder(f"{callee.name}.tile", self.tiling)
        self.tiles: dict[str, Value] = {}  # callee value name -> its tile
        self.refs: dict[str, list[Value]] = {}  # callee parameter name -> its arrays in the program
        self.mappings: dict[str, ArrayMapping] = {}
        self.extra: list[Function] = []

    def tile_type(self, t: TensorType) -> TensorType:
        space, block, squeeze = self.tiling.space, self.tiling.block, self.tiling.squeeze
        dims = [(None if d in squeeze else (block[d] if n == space[d] else 1))
                for d, n in zip(value_space_dims(space, t.shape, self.reduce_axes), t.shape)]
        return t.with_shape(tuple(b for b in dims if b is not None))

    def lower(self) -> list[Function]:
        op, callee, b = self.op, self.callee, self.b
        in_views = {int(i): View.decode(v) for i, v in op.attr("in_views", ())}
        out_views = {int(j): View.decode(v) for j, v in op.attr("out_views", ())}
        roles = _param_roles(callee)
        space = self.tiling.space
        for i, (operand, p) in enumerate(zip(op.operands, callee.params)):
            if isinstance(p.type.elem, LowBitType):
                self.refs[p.name] = [b.param(f"in{i}_{j}", t) for j, t in
                                     enumerate(p.type.elem.part_types(p.type.shape))]
                continue
            ref = b.param(f"in{i}", operand.type)
            self.refs[p.name] = [ref]
            self.mappings[p.name] = ArrayMapping.of(value_block_dims(op, callee, p), p.type.shape,
                                                    in_views.get(i), False)
            if p.name not in roles:
                _check_fits(p, space, callee.name, self.reduce_axes)
        outs = []
        for j, (result, v) in enumerate(zip(op.results, callee.returns)):
            _check_fits(v, space, callee.name, self.reduce_axes)
            outs.append((b.param(f"out{j}", result.type), v,
                         ArrayMapping.of(value_block_dims(op, callee, v), v.type.shape, out_views.get(j), True)))
        for p in callee.params:
            if p.name not in roles and p.name in self.mappings:
                self.tiles[p.name] = self.load(p, b)
        dots = [o for o in callee.ops if o.opcode == "dot"]
        # Split-K with a cast after the reduction: the program that adds the last partial sum
        # finishes the output (a serial fixup); without the cast, partial sums go into the output.
        fixup = self.tiling.split > 1 and cast_epilogue(callee) is not None and len(outs) == 1
        last = None
        for o in callee.ops:
            if o.opcode == "dot" and o is dots[0]:
                self.k_loop(dots)
                if fixup:
                    last = self.fixup(dots[0], outs[0][2])
            elif o.opcode not in ("dot", "dequantize"):  # dots run in the first one's K loop
                self.translate(o)
        write = "atomic_add" if self.tiling.split > 1 and not fixup else "store"
        for ref, v, mapping in outs:
            tile = self.tiles[v.name]
            indices = [b.index(e) for e in mapping.index]
            b.access(write, ref, indices, mapping.blocks, ref.type, tile, when=last)
        return [b.function([]), *self.extra]

    def fixup(self, dot: Op, mapping: ArrayMapping) -> Value:
        """A split-K program's serial fixup (:func:`split_k_fixup`): its dot's tile becomes the
        finished sum; returns the "last program" predicate."""
        total, last = split_k_fixup(self.b, self.tiling, dot.result.type.shape, mapping, self.tiles[dot.result.name])
        self.tiles[dot.result.name] = total
        return last

    def load(self, p: Value, b: TileBuilder, slices: dict[int, tuple[Value, int]] | None = None,
             pids: dict[int, Value] | None = None) -> Value:
        """Loads parameter ``p``'s block; ``slices`` replaces the block and index of some
        dimensions (the K loop's)."""
        mapping, ref = self.mappings[p.name], self.refs[p.name][0]
        slices = slices or {}
        blocks = [slices[d][1] if d in slices else blk for d, blk in enumerate(mapping.blocks)]
        indices = [b.index(e, pids) if d not in slices else self.k_index(b, e, pids, *slices[d])
                   for d, e in enumerate(mapping.index)]
        tile = b.access("load", ref, indices, tuple(blocks), ref.type, hint=p.name)
        assert tile is not None
        return tile

    @staticmethod
    def k_index(b: TileBuilder, expr: IndexExpr, pids: dict[int, Value] | None, kk: Value, bk: int) -> Value:
        """The block index (in K steps) of step ``kk`` within the K block that ``expr`` picks (in
        units of the whole K block of ``steps * bk``, where a folded view puts it)."""
        if expr == (0, ()):
            return kk
        steps = b.k_steps
        outer = b.index(expr, pids)
        scaled = outer if steps == 1 else b.value("mul", [outer, b.const(steps)], SCALAR, "i")
        return b.value("add", [scaled, kk], SCALAR, "i")

    def translate(self, o: Op) -> None:
        """A graph-level op of the kernel body, on tiles."""
        b, t = self.b, self.tiling
        attrs = o.attr_dict
        operands = [self.tiles[v.name] for v in o.operands]
        result = self.tile_type(o.result.type)
        if o.opcode in ("reshape", "transpose", "slice", "concatenate", "argmax", "argmin", "opaque", "call"):
            raise FusecError(f"the Pallas backend cannot put op {o.opcode!r} in a kernel")
        if o.opcode == "broadcast":
            dims = attrs["dims"]
            kept = [i for i in range(o.operands[0].type.rank) if dims[i] not in t.squeeze]
            attrs |= {"shape": result.shape, "dims": tuple(t.tile_axis(dims[i]) for i in kept)}
        elif o.opcode in ("constant",):
            attrs["shape"] = result.shape
        elif o.opcode == "iota":
            self.tiles[o.result.name] = self.iota(o, result)
            return
        elif o.opcode == "reduce":
            axes = attrs["axes"]
            attrs["axes"] = tuple(t.tile_axis(a) for a in axes)
            partial = [d for d in axes if t.space[d] != t.block[d]]
            if partial:
                operands = [self.mask_padding(operands[0], str(attrs["kind"]), partial)]
        self.tiles[o.result.name] = b.value(o.opcode, operands, result, o.result.name, **attrs)

    def mask_padding(self, x: Value, kind: str, axes: list[int]) -> Value:
        """``x`` with the elements past the space's end along the reduced ``axes`` replaced by the
        reduction's identity."""
        b, t = self.b, self.tiling
        shape = x.type.shape
        key = ("inside", shape, tuple(axes))
        if key not in b.memo:
            inside: Value | None = None
            for d in axes:
                index = b.value("element_index", [b.program_id(d)], TensorType(I32, shape), "cols",
                                block=t.block[d], dimension=t.tile_axis(d), shape=shape)
                here = b.value("lt", [index, b.const(t.space[d], TensorType(I32, shape))], TensorType(BOOL, shape),
                               "inside")
                inside = here if inside is None else b.value("and", [inside, here], here.type, "inside")
            assert inside is not None
            b.memo[key] = inside
        identity = b.const(reduction_identity(kind, x.type.elem), x.type)
        return b.value("select", [b.memo[key], identity, x], x.type, "masked")

    def iota(self, o: Op, result: TensorType) -> Value:
        b, t = self.b, self.tiling
        d = int(o.attr("dimension"))
        if o.result.type.shape[d] == 1:
            return b.const(0 if o.result.type.elem != F32 else 0.0, result)
        i32 = result.with_elem(I32)
        if d in t.squeeze:
            index = b.value("broadcast", [b.program_id(d)], i32, "iota", dims=(), shape=result.shape)
        else:
            index = b.value("element_index", [b.program_id(d)], i32, "iota", block=t.block[d],
                            dimension=t.tile_axis(d), shape=result.shape)
        if result.elem == I32:
            return index
        return b.value("convert", [index], result, o.result.name, dtype=str(result.elem))

    def k_loop(self, dots: list[Op]) -> None:
        """The matmul's K loop: a loop whose body loads K slices (the lhs once for all sibling
        dots), unpacks packed weights and accumulates each dot in f32 (i32 for integer dots)."""
        outer, t, callee = self.b, self.tiling, self.callee
        first = dots[0]
        lhs_t = bool(first.attr("lhs_t"))
        lhs = first.operands[0]
        k = lhs.type.shape[-2] if lhs_t else lhs.type.shape[-1]
        bk = int(t.bk or k)
        steps = -(-k // bk)
        split = t.split
        trips = -(-steps // split)  # K steps per program
        bm, bn = t.block[-2], t.block[-1]
        producers = {r.name: o for o in callee.ops for r in o.results}
        elem = lhs.type.elem
        acc_type = TensorType(I32 if isinstance(elem, DType) and elem.is_int else F32, (bm, bn))
        inits = [outer.const(0 if acc_type.elem == I32 else 0.0, acc_type) for _ in dots]
        # The body takes the loop index, the accumulators, then every array and program id it uses.
        captured_refs = [r for name in self.refs for r in self.refs[name]]
        pid_axes = list(range(len(t.launch_grid)))
        captured = captured_refs + [outer.program_id(a) for a in pid_axes]
        body = TileBuilder(f"{callee.name}.tile.k", t)
        kk = body.param("kk", SCALAR)
        body.k_steps = steps
        body.scalars.intervals[kk.name] = (0, trips - 1)
        accs = [body.param(f"acc{n}", acc_type) for n in range(len(dots))]
        inner = body.capture(outer, captured)
        pids = {a: inner[outer.program_id(a).name] for a in pid_axes}
        saved_refs = self.refs
        self.refs = {name: [inner[r.name] for r in rs] for name, rs in self.refs.items()}
        if split > 1:  # this program's K steps: split index x trips + kk
            part = pids[len(t.space)]
            kk = body.value("add", [body.value("mul", [part, body.const(trips)], SCALAR, "i"), kk], SCALAR, "k")
        a_k = 0 if lhs_t else 1
        # The K dimension's position among the lhs array's dimensions (its kept ones, in order).
        a = self.load(lhs, body, {self._array_dim(lhs, a_k): (kk, bk)}, pids)
        new_accs = []
        for n, dot in enumerate(dots):
            rhs_t = bool(dot.attr("rhs_t"))
            dq = producers.get(dot.operands[1].name)
            if t.strategy == "gemv-pairs" and dq is not None and dq.opcode == "dequantize":
                new_accs.append(self.paired(body, accs[n], a, dq, kk, bk, bn, pids))
                continue
            if dq is not None and dq.opcode == "dequantize":
                rhs = self.unpack(dq, body, kk, bk, bn, pids)
            else:
                rhs = self.load(dot.operands[1], body, {self._array_dim(dot.operands[1], 1 if rhs_t else 0): (kk, bk)},
                                pids)
            if t.strategy == "gemv-fma" and not (lhs_t or rhs_t):
                new_accs.append(self.fma(body, accs[n], a, rhs))
                continue
            precision = {key: dot.attr(key) for key in ("precision", "precision_pair", "algorithm")
                         if dot.attr(key) is not None}
            new_accs.append(body.value("dot_acc", [accs[n], a, rhs], acc_type, f"acc{n}", lhs_t=lhs_t, rhs_t=rhs_t,
                                       **precision))
        self.refs = saved_refs
        self.extra.append(body.function(new_accs))
        results = [Value(outer.fresh(f"acc{n}.out"), acc_type) for n in range(len(dots))]
        outer.ops.append(Op.make("loop", [*inits, *captured], results, body=body.name, trips=trips,
                                 carried=len(dots)))
        for dot, acc in zip(dots, results):
            out = self.tile_type(dot.result.type)
            self.tiles[dot.result.name] = acc if out == acc.type else outer.value(
                "convert", [acc], out, dot.result.name, dtype=str(out.elem))

    @staticmethod
    def fma(b: TileBuilder, acc: Value, a: Value, w: Value) -> Value:
        """``acc + a @ w`` on the FMA units: a broadcasting multiply summed over K (few rows: no
        tensor-core padding to 16 rows, no shared-memory round trip of the decoded tile)."""
        (bm, bk), bn = a.type.shape, w.type.shape[1]
        cube = TensorType(F32, (bm, bk, bn))
        a32, w32 = (x if x.type.elem == F32 else b.value("convert", [x], x.type.with_elem(F32), "f", dtype="f32")
                    for x in (a, w))
        ab = b.value("broadcast", [a32], cube, "ab", dims=(0, 1), shape=cube.shape)
        wb = b.value("broadcast", [w32], cube, "wb", dims=(1, 2), shape=cube.shape)
        part = b.value("reduce", [b.value("mul", [ab, wb], cube, "p")], acc.type, "part", axes=(1,), kind="sum")
        return b.value("add", [acc, part], acc.type, "acc")

    def _array_dim(self, p: Value, kept_pos: int) -> int:
        """The array dimension holding position ``kept_pos`` of ``p``'s block value."""
        kept = [d for d, blk in enumerate(self.mappings[p.name].blocks) if blk is not None]
        return kept[kept_pos]

    def paired(self, b: TileBuilder, acc: Value, a: Value, dq: Op, kk: Value, bk: int, bn: int,
               pids: dict[int, Value]) -> Value:
        """``acc + a @ dequantize(w)`` for one K step inside one scale group, two codes per 32-bit
        decode (``unpack_pair``): the matmul runs on the biased codes (exact small integers in
        the activations' 16-bit float), one dot per lane pair with the activations those codes
        multiply (``pick_lanes``); the bias times the step's activation sums comes off, and the
        group's scale multiplies, once per output element instead of once per weight."""
        fmt = dq.operands[0].type.elem
        assert isinstance(fmt, LowBitType)
        dtype = str(dq.result.type.elem)
        *words, scale = self.packed_tiles(dq, b, kk, bk, bn, pids)  # per plane, then the scale row
        lanes = pair_lanes(fmt)
        bm = a.type.shape[0]
        table = pair_is_table(fmt)  # table values themselves (no bias), adjacent codes paired
        if table:
            g = b.const(0.0, acc.type)
        else:  # the dots accumulate onto minus the bias times the step's activation sums (no add after)
            sums = b.value("reduce", [b.value("convert", [a], a.type.with_elem(F32), "xf", dtype="f32")],
                           TensorType(F32, (bm,)), "xsum", axes=(1,), kind="sum")
            bias = b.value("mul", [sums, b.const(float(-pair_bias(fmt, dtype)), sums.type)], sums.type, "bias")
            g = b.value("broadcast", [bias], acc.type, "g", dims=(0,), shape=acc.type.shape)
        # Two lanes per dot where one lane's would be only 16 deep (a 32-deep dot's tensor-core steps
        # chain; separate dots' results are added); 3 bits: rows by word parity; tables: adjacent
        # codes, one lane per dot (tile_ops).
        count = 2 if 2 * bk // lanes == 16 and lanes >= 4 and not table else 1
        order = ({"parity": True} if len(words) > 1 else {}) | ({"count": count} if count > 1 else {})
        extra = {"lut": dq.attr("lut")} if dq.attr("lut") is not None else {}
        for j in range(0, lanes // 2, count):
            x = b.value("pick_lanes", [a], a.type.with_shape((bm, 2 * count * bk // lanes)), "x", lanes=lanes,
                        lane=j, **order, **({"adjacent": True} if table else {}))
            w = b.value("unpack_pair", words, TensorType(dq.result.type.elem, (2 * count * bk // lanes, bn)), "w",
                        format=str(fmt), lane=j, dtype=dtype, **order, **extra)
            g = b.value("dot_acc", [g, x, w], acc.type, "g", lhs_t=False, rhs_t=False)
        scales = b.value("broadcast", [scale], acc.type, "scale", dims=(0, 1), shape=acc.type.shape)
        step = b.value("mul", [g, scales], acc.type, "step")
        return b.value("add", [acc, step], acc.type, "acc")

    def packed_tiles(self, dq: Op, b: TileBuilder, kk: Value, bk: int, bn: int, pids: dict[int, Value]) -> list[Value]:
        """Loads the words of a [bk, bn] tile of a packed weight (per plane), then its scale row
        (and zero-points)."""
        weight = dq.operands[0]
        fmt = weight.type.elem
        assert isinstance(fmt, LowBitType)
        k = weight.type.shape[0]
        parts = self.refs[weight.name]
        col = pids[len(self.tiling.space) - 1]
        tiles = []
        for j, p in enumerate(fmt.plane_widths):
            rows = bk * p // 32
            tiles.append(b.access("load", parts[j], [kk, col], (rows, bn), parts[j].type, hint=f"words{j}"))
        group = fmt.rows_per_scale(k)
        row = b.const(0) if group >= k else b.value("div", [b.value("mul", [kk, b.const(bk)], SCALAR, "i"),
                                                            b.const(group)], SCALAR, "row")
        for j in range(len(fmt.plane_widths), len(parts)):
            tiles.append(b.access("load", parts[j], [row, col], (1, bn), parts[j].type, hint="scale"))
        return [t for t in tiles if t is not None]

    def unpack(self, dq: Op, b: TileBuilder, kk: Value, bk: int, bn: int, pids: dict[int, Value]) -> Value:
        """Loads the words of a [bk, bn] tile of a packed weight, its scale row (and zero-points),
        and unpacks them."""
        fmt = dq.operands[0].type.elem
        tiles = self.packed_tiles(dq, b, kk, bk, bn, pids)
        attrs = {"format": str(fmt), "shape": (bk, bn), "dtype": str(dq.result.type.elem)}
        if dq.attr("lut") is not None:
            attrs["lut"] = dq.attr("lut")
        return b.value("unpack", tiles, TensorType(dq.result.type.elem, (bk, bn)),
                       dq.result.name, **attrs)


def lower_kernel(op: Op, callee: Function, module: Module | None = None) -> list[Function]:
    """The tile program of a tiled kernel op (first) and the bodies of its loops (``module``
    holds the attention a split-decode kernel was made from)."""
    if op.attr("kind") == "decode-combine":
        from fusec.passes.to_tile_decode import lower_combine
        return lower_combine(op, callee)
    if op.attr("decode_split") is not None:
        from fusec.passes.to_tile_decode import lower_decode
        if module is None:
            raise FusecError(f"kernel {callee.name}: a split-decode kernel is lowered from its module")
        return lower_decode(op, module.function(str(op.attr("pattern"))))
    if op.attr("kind") == "attention":
        from fusec.passes.to_tile_attention import lower_attention  # it imports this module's builder
        return lower_attention(op, callee)
    if op.attr("kind") == "attention_bwd":
        from fusec.passes.to_tile_attention_bwd import lower_attention_backward
        return lower_attention_backward(op, callee)
    return _KernelLowering(op, callee).lower()


@register_pass
@dataclass(frozen=True)
class ToTile(Pass):
    """Adds each tiled kernel's tile program to the module and names it in the op's ``tile``."""

    name = "to-tile"

    def run(self, module: Module) -> Module:
        added: list[Function] = []
        out = []
        for f in module.functions:
            ops = []
            for op in f.ops:
                if op.opcode == "kernel" and "block" in op.attr_dict:
                    try:
                        programs = lower_kernel(op, module.function(str(op.attr("callee"))), module)
                    except FusecError:
                        programs = []  # left to codegen, which reports why it cannot build it
                    if programs:
                        added += programs
                        op = Op(op.opcode, op.operands, op.results,
                                Op.make("kernel", **(op.attr_dict | {"tile": programs[0].name})).attrs, op.loc)
                ops.append(op)
            out.append(Function(f.name, f.params, tuple(ops), f.returns))
        existing = {f.name for f in out}
        return module.replace_functions(out + [f for f in added if f.name not in existing])
