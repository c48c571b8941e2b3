"""The verifier: SSA well-formedness and every op's type rule. Errors name the op and the operand."""

from __future__ import annotations

from fusec.errors import VerifyError
from fusec.ir.function import Function, Module, Op
from fusec.ir.opdefs import OPDEFS, TypeRuleError, infer_result_types
from fusec.ir.printer import format_op
from fusec.ir.tile_verify import is_tile_program, loop_bodies, verify_tile_program
from fusec.ir.tiling import KernelTiling
from fusec.ir.types import F32, I32, LowBitType


def _fail(func: Function, op: Op | None, message: str) -> VerifyError:
    where = f"in @{func.name}"
    if op is not None:
        where += f", op '{op.opcode}' ({format_op(op)})"
    return VerifyError(f"{where}: {message}")


def _verify_call(module: Module, func: Function, op: Op) -> None:
    missing = [a for a in OPDEFS[op.opcode].required_attrs if a not in op.attr_dict]
    if missing:
        raise _fail(func, op, f"is missing attribute(s) {', '.join(missing)}")
    callee_name = op.attr("callee")
    try:
        callee = module.function(str(callee_name))
    except KeyError:
        raise _fail(func, op, f"calls unknown function @{callee_name}") from None
    if callee.name == func.name:
        raise _fail(func, op, "calls its own function; recursion is not supported")
    if len(op.operands) != len(callee.params):
        raise _fail(func, op, f"passes {len(op.operands)} operands to @{callee.name}, which takes {len(callee.params)}")
    # A kernel may read an operand (or write a result) through a folded view of another shape.
    in_views = {int(i): tuple(v[0]) for i, v in op.attr("in_views", ())}
    out_views = {int(j): tuple(v[0]) for j, v in op.attr("out_views", ())}
    for i, (v, p) in enumerate(zip(op.operands, callee.params)):
        if i in in_views and v.type.shape == in_views[i] and v.type.elem == p.type.elem:
            continue
        if v.type != p.type:
            raise _fail(func, op, f"operand #{i} {v} has type {v.type}, but @{callee.name} takes {p.type}")
    declared = [r.type if j not in out_views or r.type.shape != out_views[j] else callee.result_types[j]
                for j, r in enumerate(op.results)]
    if declared != list(callee.result_types):
        raise _fail(func, op, f"declares results ({', '.join(map(str, declared))}) but @{callee.name} returns "
                              f"({', '.join(map(str, callee.result_types))})")


def _verify_tiling(func: Function, op: Op) -> None:
    """A tiled kernel's grid covers its iteration space exactly, with power-of-two blocks."""
    try:
        KernelTiling.from_attrs(op.attr_dict)
    except ValueError as e:
        raise _fail(func, op, f"kernel {op.attr('callee')}: {e}") from None


def _verify_tile_link(module: Module, func: Function, op: Op) -> None:
    """A kernel's tile program takes its arrays (a low-bit weight as its parts), then its results,
    then its workspace."""
    try:
        program = module.function(str(op.attr("tile")))
    except KeyError:
        raise _fail(func, op, f"names unknown tile program @{op.attr('tile')}") from None
    want = [t for v in op.operands for t in (v.type.elem.part_types(v.type.shape)
                                             if isinstance(v.type.elem, LowBitType) else [v.type])]
    want += [r.type for r in op.results]
    # Then the kernel's own workspace, if any (a split-K fixup's f32 sums and i32 arrival counters).
    scratch = [p.type for p in program.params[len(want):]]
    if [p.type for p in program.params[:len(want)]] != want or \
            any(t.elem not in (F32, I32) or t.rank not in (1, 2) for t in scratch):
        raise _fail(func, op, f"tile program @{program.name} takes ({', '.join(str(p.type) for p in program.params)}), "
                              f"not the kernel's arrays ({', '.join(map(str, want))})")
    grid = tuple(op.attr("grid", ())) + ((int(op.attr("split")),) if int(op.attr("split", 1)) > 1 else ())
    for axis, size in verify_tile_program(module, program).items():
        if axis >= len(grid) or grid[axis] != size:
            raise _fail(func, op, f"tile program @{program.name} runs {size} programs along grid axis {axis}, "
                                  f"but the kernel's grid is {list(grid)}")


def verify_function(func: Function, module: Module | None = None) -> None:
    """Raises :class:`VerifyError` on the first problem in ``func``."""
    defined: dict[str, object] = {}
    for p in func.params:
        if p.name in defined:
            raise _fail(func, None, f"parameter %{p.name} is declared twice")
        defined[p.name] = p
    for op in func.ops:
        opdef = OPDEFS.get(op.opcode)
        if opdef is None:
            raise _fail(func, op, f"unknown opcode {op.opcode!r}")
        for i, v in enumerate(op.operands):
            if v.name not in defined:
                raise _fail(func, op, f"operand #{i} {v} is not defined before this op")
            if defined[v.name] != v:
                raise _fail(func, op, f"operand #{i} {v} has type {v.type}, but it was defined as "
                                      f"{defined[v.name].type}")  # type: ignore[attr-defined]
        if opdef.kind == "call":
            if module is None:
                raise _fail(func, op, "a call can only be verified within its module")
            _verify_call(module, func, op)
            if op.opcode == "kernel" and "block" in op.attr_dict:
                _verify_tiling(func, op)
            if op.opcode == "kernel" and "tile" in op.attr_dict:
                _verify_tile_link(module, func, op)
        elif opdef.rule is not None:
            try:
                expected = infer_result_types(op.opcode, [v.type for v in op.operands], op.attr_dict)
            except TypeRuleError as e:
                prefix = "" if e.operand is None else f"operand #{e.operand} {op.operands[e.operand]} "
                raise _fail(func, op, prefix + str(e)) from None
            declared = [r.type for r in op.results]
            if declared != expected:
                raise _fail(func, op, f"declares result type(s) ({', '.join(map(str, declared))}) but its operands "
                                      f"and attributes give ({', '.join(map(str, expected))})")
        else:
            missing = [a for a in opdef.required_attrs if a not in op.attr_dict]
            if missing:
                raise _fail(func, op, f"is missing attribute(s) {', '.join(missing)}")
        for r in op.results:
            if r.name in defined:
                raise _fail(func, op, f"result {r} redefines a value; SSA values are defined once")
            defined[r.name] = r
    for i, v in enumerate(func.returns):
        if v.name not in defined or defined[v.name] != v:
            raise _fail(func, None, f"returned value #{i} {v} is not defined in the function")


def verify_module(module: Module) -> None:
    """Verifies every function of ``module`` and that function names are unique."""
    if not module.functions:
        raise VerifyError("module has no functions")
    seen: set[str] = set()
    for func in module.functions:
        if func.name in seen:
            raise VerifyError(f"function @{func.name} is defined twice")
        seen.add(func.name)
        verify_function(func, module)
    bodies = loop_bodies(module)
    for func in module.functions:
        # Loop bodies are proved in their loop's context (index range, captured values).
        if func.name not in bodies and is_tile_program(func):
            verify_tile_program(module, func)
