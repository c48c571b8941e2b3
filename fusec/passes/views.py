"""Views folded into block index maps.

A kernel operand that is a slice, split-reshape and transpose of some array is read straight from
that array: the kernel's BlockSpec addresses the array through the view, so the slices and
transposes never run. Likewise a kernel result consumed only by transposes and merge-reshapes is
written straight into their final array. The ``fold-views`` pass records each folded view on the
kernel op (``in_views``/``out_views``); the Pallas backend turns them into index maps with
:func:`block_spec_through_view`.

A view maps each of its dimensions k to one axis ``axis[k]`` of the base array with a stride
``coef[k]``, plus an offset per base axis: base[a] = offset[a] + sum(coef[k] * index[k]).
"""

from __future__ import annotations

from dataclasses import dataclass

from fusec.ir import Function, Module, Op, Value
from fusec.passes.base import Pass, register_pass

# How a kernel reads or writes one dimension of a value: (block size or None when squeezed,
# grid axis whose index picks the block, or None for block index 0).
BlockDim = tuple[int | None, int | None]


@dataclass(frozen=True)
class View:
    base_shape: tuple[int, ...]
    axis: tuple[int, ...]
    coef: tuple[int, ...]
    offset: tuple[int, ...]

    @staticmethod
    def identity(shape: tuple[int, ...]) -> View:
        return View(shape, tuple(range(len(shape))), (1,) * len(shape), (0,) * len(shape))

    def encode(self) -> tuple:
        return (self.base_shape, self.axis, self.coef, self.offset)

    @staticmethod
    def decode(attr: tuple) -> View:
        return View(*(tuple(x) for x in attr))


def _apply(view: View, op: Op) -> View | None:
    """The view of ``op``'s result, given the view of its operand; None if it is not expressible."""
    if op.opcode == "slice":
        if any(s != 1 for s in op.attr("strides")):
            return None
        offset = list(view.offset)
        for k, start in enumerate(op.attr("start")):
            offset[view.axis[k]] += start * view.coef[k]
        return View(view.base_shape, view.axis, view.coef, tuple(offset))
    if op.opcode == "transpose":
        perm = op.attr("perm")
        return View(view.base_shape, tuple(view.axis[p] for p in perm), tuple(view.coef[p] for p in perm),
                    view.offset)
    if op.opcode == "reshape":
        return _split(view, op.operands[0].type.shape, op.result.type.shape)
    return None


def _split(view: View, src: tuple[int, ...], dst: tuple[int, ...]) -> View | None:
    """A reshape that only splits dimensions (or adds and drops size-1 ones)."""
    axis: list[int] = []
    coef: list[int] = []
    j = 0
    for k, n in enumerate(src):
        if n == 1:
            continue
        while j < len(dst) and dst[j] == 1:
            axis.append(0)
            coef.append(0)
            j += 1
        group: list[int] = []
        product = 1
        while j < len(dst) and product < n:
            group.append(dst[j])
            product *= dst[j]
            j += 1
        if product != n:
            return None
        stride = n
        for size in group:
            stride //= size
            axis.append(view.axis[k])
            coef.append(view.coef[k] * stride if size > 1 else 0)
    while j < len(dst):
        if dst[j] != 1:
            return None
        axis.append(0)
        coef.append(0)
        j += 1
    return View(view.base_shape, tuple(axis), tuple(coef), view.offset)


def block_spec_through_view(view: View, shape: tuple[int, ...], dims: list[BlockDim], output: bool
                            ) -> tuple[list[int | None], list[tuple[int, list[tuple[int, int]]]]] | None:
    """The base array's block dims and block index (constant, [(coef, grid axis)]) per base axis
    for reading (or, ``output``, writing) a value of ``shape`` through ``view`` with ``dims``;
    None when the view cannot be addressed blockwise."""
    n_base = len(view.base_shape)
    inner: dict[int, int] = {}
    outer: dict[int, list[int]] = {a: [] for a in range(n_base)}
    for k, size in enumerate(shape):
        block, _ = dims[k]
        if size == 1 and view.coef[k] == 0:
            if block is not None:
                return None  # a kept size-1 dimension has no counterpart in the base array
            continue
        if view.coef[k] == 1 and block is not None:
            if view.axis[k] in inner:
                return None
            inner[view.axis[k]] = k
        elif block is None or block == 1 and view.coef[k] == 1:
            outer[view.axis[k]].append(k)
        else:
            return None
    base_blocks: list[int | None] = []
    index: list[tuple[int, list[tuple[int, int]]]] = []
    order: list[int] = []
    for a in range(n_base):
        terms = [(view.coef[k], dims[k][1]) for k in outer[a] if dims[k][1] is not None]
        if a not in inner:
            base_blocks.append(None)
            index.append((view.offset[a], [(c, g) for c, g in terms]))
            continue
        k0 = inner[a]
        b = dims[k0][0]
        assert b is not None
        if view.offset[a] % b or any(c % b for c, _ in terms):
            return None
        if output and outer[a] and (shape[k0] % b):
            return None  # a partial (or oversized) block would write into its neighbour's elements
        base_blocks.append(b)
        g0 = dims[k0][1]
        index.append((view.offset[a] // b, [(c // b, g) for c, g in terms] + ([(1, g0)] if g0 is not None else [])))
        order.append(k0)
    if order != [k for k, (block, _) in enumerate(dims) if block is not None and
                 not (shape[k] == 1 and view.coef[k] == 0)]:
        return None  # the base array's axes would come in another order than the value's
    return base_blocks, index


def value_space_dims(space: tuple[int, ...], shape: tuple[int, ...], reduce_axes: tuple[int, ...] | None = None
                     ) -> list[int]:
    """The space dimension each dimension of a value of ``shape`` lies along: all of them for a
    value of the space's rank, the space less its reduced axes (its last unless given) for a row."""
    if len(shape) == len(space):
        return list(range(len(space)))
    axes = reduce_axes if reduce_axes is not None else (len(space) - 1,)
    return [d for d in range(len(space)) if d not in axes][:len(shape)]


def space_block_dims(space: tuple[int, ...], block: tuple[int, ...], squeeze: tuple[int, ...],
                     shape: tuple[int, ...], reduce_axes: tuple[int, ...] | None = None) -> list[BlockDim]:
    """Block dims of a value of ``shape`` laid on the iteration space: the space's rank with 1s
    where it is broadcast, or the space less its reduced axes (a row value)."""
    dims = value_space_dims(space, shape, reduce_axes)
    return [(None if d in squeeze else (block[d] if n == space[d] else 1),
             d if n == space[d] and n != 1 else None) for d, n in zip(dims, shape)]


def value_block_dims(kernel: Op, func: Function, value: Value) -> list[BlockDim]:
    """How ``kernel`` reads a parameter (or writes a result) ``value`` of its function ``func``."""
    space, block = tuple(kernel.attr("space")), tuple(kernel.attr("block"))
    squeeze, r = tuple(kernel.attr("squeeze")), len(tuple(kernel.attr("space")))
    dq = next((op for op in func.ops if op.opcode == "dequantize" and value in op.operands), None)
    if dq is not None and value in func.params:
        # Packed planes, scales and zero-points: every row, one column block; the K loop slices rows.
        return [(value.type.shape[0], None), (block[-1], r - 1)]
    dot = next((op for op in func.ops if op.opcode == "dot" and value in op.operands), None)
    if dot is not None and value in func.params:
        lhs = value == dot.operands[0]
        transposed = bool(dot.attr("lhs_t" if lhs else "rhs_t"))
        bk = int(kernel.attr("bk"))
        k = value.type.shape[-2] if lhs == transposed else value.type.shape[-1]
        kp = -(-k // bk) * bk
        other: BlockDim = (block[-2], r - 2) if lhs else (block[-1], r - 1)
        inner = [other, (kp, None)] if lhs != transposed else [(kp, None), other]
        return [(None, d) for d in range(r - 2)] + inner
    reduce_axes = kernel.attr("reduce_axes")
    return space_block_dims(space, block, squeeze, value.type.shape,
                            tuple(reduce_axes) if reduce_axes is not None else None)


def _single_user(func: Function, value: Value) -> Op | None:
    users = [op for op in func.ops if value in op.operands]
    returned = value in func.returns
    return users[0] if len(users) == 1 and not returned else None


def _fold_kernel(func: Function, kernel: Op, callee: Function, producers: dict[str, Op]
                 ) -> tuple[Op, set[int]]:
    """The kernel op with views folded in, and the ids of ops it makes redundant."""
    operands = list(kernel.operands)
    results = list(kernel.results)
    in_views: list = []
    out_views: list = []
    dead: set[int] = set()
    for i, value in enumerate(kernel.operands):
        chain: list[Op] = []
        v = value
        while v.name in producers and producers[v.name].opcode in ("slice", "reshape", "transpose"):
            chain.append(producers[v.name])
            v = producers[v.name].operands[0]
        dims = value_block_dims(kernel, callee, callee.params[i])
        for cut in range(len(chain), 0, -1):
            base = chain[cut - 1].operands[0]
            view: View | None = View.identity(base.type.shape)
            for op in reversed(chain[:cut]):
                view = _apply(view, op) if view is not None else None
            if view is not None and block_spec_through_view(view, value.type.shape, dims, False) is not None:
                operands[i] = base
                in_views.append((i, view.encode()))
                break
    for j, result in enumerate(kernel.results):
        chain = []
        v = result
        user = _single_user(func, v)
        while user is not None and user.opcode in ("reshape", "transpose"):
            chain.append(user)
            v = user.result
            user = _single_user(func, v)
        dims = value_block_dims(kernel, callee, callee.returns[j])
        for cut in range(len(chain), 0, -1):
            final = chain[cut - 1].result
            view = _inverse_view(chain[:cut], final)
            if view is not None and block_spec_through_view(view, result.type.shape, dims, True) is not None:
                results[j] = final
                out_views.append((j, view.encode()))
                dead.update(id(op) for op in chain[:cut])
                break
    attrs = kernel.attr_dict
    if in_views:
        attrs["in_views"] = tuple(in_views)
    if out_views:
        attrs["out_views"] = tuple(out_views)
    return Op.make("kernel", operands, results, **attrs), dead


def _inverse_view(chain: list[Op], final: Value) -> View | None:
    """The kernel result as a view of ``final``, for a chain of transposes and merge-reshapes."""
    view: View | None = View.identity(final.type.shape)
    for op in reversed(chain):
        if view is None:
            return None
        if op.opcode == "transpose":
            perm = op.attr("perm")
            inverse = [perm.index(k) for k in range(len(perm))]
            view = View(view.base_shape, tuple(view.axis[p] for p in inverse), tuple(view.coef[p] for p in inverse),
                        view.offset)
        else:
            view = _split(view, op.result.type.shape, op.operands[0].type.shape)
    return view


@register_pass
@dataclass(frozen=True)
class FoldViews(Pass):
    """Folds slices, reshapes and transposes around kernels into their block index maps."""

    name = "fold-views"

    def run(self, module: Module) -> Module:
        out = []
        for func in module.functions:
            if not any(op.opcode == "kernel" and "block" in op.attr_dict for op in func.ops):
                out.append(func)
                continue
            producers = {r.name: op for op in func.ops for r in op.results}
            dead: set[int] = set()
            replaced: dict[int, Op] = {}
            for op in func.ops:
                # Attention kernels (and the decode combine) address their arrays themselves.
                own = op.attr("kind") in ("attention", "decode-combine")
                if op.opcode == "kernel" and id(op) not in dead and not own:
                    new, newly_dead = _fold_kernel(func, op, module.function(str(op.attr("callee"))), producers)
                    replaced[id(op)] = new
                    dead |= newly_dead
                    # Values the kernel now writes directly are its own, not views, for later kernels.
                    producers.update({r.name: new for r in new.results})
            # A kernel now writing a later value directly still precedes that value's users: the
            # reshapes and transposes it replaces all came after it.
            ops = [replaced.get(id(op), op) for op in func.ops if id(op) not in dead]
            out.append(Function(func.name, func.params, tuple(ops), func.returns))
        return module.replace_functions(out)
