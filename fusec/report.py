"""``fusec.inspect``: what fusec made of a function, as a report object, a table and JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from fusec.ir import DType, Function, KernelTiling, LowBitType, Module, Op
from fusec.passes.cost import FREE_OPS, nbytes, op_cost
from fusec.passes.tiling import default_tiling, kernel_facts, tuned_config
from fusec.passes.tune_space import config_of
from fusec.roofline import gpu as gpu_spec
from fusec.roofline import modeled_time

# 2: equation counts and each kernel's primitives; 3: bodies, trips, fallback bytes; 4: gpu_config;
# 5: gpu_backend (what lowering for cuda emits, and why when it is not the backend asked for)
REPORT_VERSION = 5


@dataclass(frozen=True)
class KernelReport:
    name: str
    kind: str
    backend: str
    ops: list[str]  # the IR ops fused into it, in order
    primitives: list[str]  # the JAX primitives whose equations it runs, in order of first appearance
    grid: list[int]
    block: list[int]
    bytes_read: int
    bytes_written: int
    flops: int
    arithmetic_intensity: float  # FLOPs per byte moved
    bits_per_weight: float | None  # for kernels reading a low-bit weight
    modeled_time_s: float  # one run; a body's kernel runs ``trips`` times per call
    source: str
    body: str = ""  # the loop or branch body it belongs to ("" at the top level), outer bodies first
    trips: int | None = 1  # runs per call of the program (None: a while loop's, not static)
    # A matmul's GPU tile config and where it came from: "m16n128k128s4w4p3 (shipped)" (autotune
    # cache, shipped file, tile pass option or default); "" for other kernels.
    gpu_config: str = ""


@dataclass(frozen=True)
class Report:
    gpu: str
    backend: str
    kernels: list[KernelReport]
    num_eqns: int  # jaxpr equations (nested jit bodies counted once per call site)
    num_fused_eqns: int  # of those, the ones with work inside a fusec kernel
    num_xla_eqns: int  # the ones with an op XLA runs; the rest became views or constants, or were removed
    xla_ops: list[str]  # ops left outside kernels (XLA runs them), reshapes and constants aside
    fallbacks: list[dict[str, Any]]  # primitive, reason, body, bytes, share
    bytes_op_by_op: int
    bytes_fused: int
    modeled_time_op_by_op_s: float
    modeled_time_fused_s: float
    gpu_backend: str = ""  # the kernels lowering for cuda emits: the backend, or Pallas and the reason

    def to_json(self) -> str:
        """Stable JSON: keys sorted, a ``version`` field; documented in the README."""
        return json.dumps({"version": REPORT_VERSION, **asdict(self)}, sort_keys=True, indent=1)

    def __str__(self) -> str:
        gpu = f"; GPU kernels: {self.gpu_backend}" if self.gpu_backend not in ("", self.backend) else ""
        lines = [f"fusec report ({self.backend} backend{gpu}, modeled on {self.gpu})",
                 f"{'kernel':24s} {'kind':11s} {'ops':>4s} {'grid':>12s} {'bytes':>12s} {'flops':>14s} "
                 f"{'flop/B':>7s} {'bits/w':>6s} {'model us':>9s}"]
        for k in self.kernels:
            bits = f"{k.bits_per_weight:.2f}" if k.bits_per_weight is not None else "-"
            runs = "" if not k.body else f"  in {k.body} x {k.trips if k.trips is not None else '?'}"
            lines.append(f"{k.name[:24]:24s} {k.kind:11s} {len(k.ops):4d} {str(k.grid):>12s} "
                         f"{k.bytes_read + k.bytes_written:12d} {k.flops:14d} {k.arithmetic_intensity:7.2f} "
                         f"{bits:>6s} {k.modeled_time_s * 1e6:9.2f}{runs}"
                         + (f"  gpu tiles {k.gpu_config}" if k.gpu_config else ""))
        lines.append(f"jaxpr equations: {self.num_eqns}: {self.num_fused_eqns} inside kernels, {self.num_xla_eqns} run "
                     f"by XLA, the rest folded into views or constants or removed")
        lines.append(f"XLA ops outside kernels: {len(self.xla_ops)} {self.xla_ops if self.xla_ops else ''}".rstrip())
        lines.append(f"fallbacks: {len(self.fallbacks)}" + "".join(
            f"\n  {f['primitive']}{' in ' + f['body'] if f['body'] else ''}: {f['bytes']} bytes "
            f"({f['share']:.1%}): {f['reason']}" for f in self.fallbacks))
        lines.append(f"bytes moved: {self.bytes_fused} fused vs {self.bytes_op_by_op} op by op "
                     f"({self.bytes_fused / max(self.bytes_op_by_op, 1):.1%}); modeled time "
                     f"{self.modeled_time_fused_s * 1e6:.1f} us vs {self.modeled_time_op_by_op_s * 1e6:.1f} us")
        return "\n".join(lines)


def _dtype_of(module: Module, callee: str) -> str:
    func = module.function(callee)
    dot = next((op for op in func.ops if op.opcode == "dot"), None)
    elem = (dot.operands[0] if dot is not None else func.returns[0]).type.elem
    return elem.name if isinstance(elem, DType) else "f32"


def _eqn_primitive(loc: str) -> str:
    """``"f#3(dot_general)"`` or ``"g@0/f#3(dot_general)"`` -> ``"dot_general"``."""
    return loc[loc.rfind("(") + 1:-1] if loc.endswith(")") else ""


@dataclass(frozen=True)
class _Site:
    """A function the program runs: the entry, or a loop or branch body (``body`` names it, with the
    bodies it sits in), ``trips`` times per call of the program (None: not static, as in a while loop)."""

    func: Function
    body: str
    trips: int | None


def _sites(module: Module) -> list[_Site]:
    """The entry and every compiled body of a loop or conditional under it, nested ones included.
    A scan body runs ``length`` times; a while loop's cond and body an unknown number; each branch
    of a cond is counted as if it ran (at most one does)."""
    out: list[_Site] = []

    def walk(func: Function, body: str, trips: int | None) -> None:
        out.append(_Site(func, body, trips))
        for op in func.ops:
            bodies = [str(b) for b in op.attr("bodies", ())] if op.opcode == "opaque" else []
            n = op.attr("trips", None)
            if trips is None or (n is None and op.attr("primitive") != "cond"):
                inner = None
            else:
                inner = trips * (1 if n is None else int(n))  # a cond's branches: as often as the cond
            for b in bodies:
                walk(module.function(b), f"{body}/{b}" if body else b, inner)

    walk(module.entry, "", 1)
    return out


def _times(site: _Site) -> int:
    """How many times the report counts one run of the site's ops (once where it is not static)."""
    return 1 if site.trips is None else site.trips


def gpu_config_of(op: Op, module: Module) -> str:
    """The GPU tile config of a matmul kernel op and its source: the op's own when its tiling came
    from a tuned config, else what GPU tiling finds for it (cache, shipped file) or its default."""
    functions = {f.name: f for f in module.functions}
    facts = kernel_facts(op, functions)
    if not facts.tunable:
        return ""
    if op.attr("tuned") is not None:
        return f"{config_of(KernelTiling.from_attrs(op.attr_dict)).label} ({op.attr('tuned')})"
    found = tuned_config(op, functions)
    if found is not None:
        return f"{found[0].label} ({found[1]})"
    default = default_tiling(facts, "gpu")
    return f"{config_of(default).label} (default)"


def build_report(lowered: Any, gpu: str = "h100") -> Report:
    """The report for a ``Lowered`` (see :meth:`fusec.FusecFunction.lower`). Kernels of loop and
    branch bodies are listed with their body and trip count; bytes and modeled times count each
    iteration (a loop's own op counts the slices and carries it moves, once)."""
    spec = gpu_spec(gpu)
    program = lowered.program
    module = program.module
    kernels = []
    fused_locs: set[str] = set()
    sites = _sites(module)
    for site in sites:
        for op in site.func.ops:
            if op.opcode != "kernel":
                continue
            name = str(op.attr("callee"))
            func = module.function(name)
            read, written, flops = int(op.attr("bytes_read")), int(op.attr("bytes_written")), int(op.attr("flops"))
            low_bit = [v for v in op.operands if isinstance(v.type.elem, LowBitType)]
            bits = (8.0 * sum(nbytes(v.type) for v in low_bit) / sum(v.type.size for v in low_bit)) if low_bit else None
            source = program.kernels[name].source if name in program.kernels else ""
            locs = list(dict.fromkeys(o.loc for o in func.ops if _eqn_primitive(o.loc)))
            fused_locs.update(locs)
            kernels.append(KernelReport(
                name, str(op.attr("kind")), program.backend, [o.opcode for o in func.ops],
                [_eqn_primitive(loc) for loc in locs], list(op.attr("grid", ())),
                list(op.attr("block", ())), read, written, flops, flops / max(read + written, 1), bits,
                modeled_time(spec, read + written, flops, _dtype_of(module, name)), source, site.body, site.trips,
                gpu_config_of(op, module)))
    # Ops XLA runs, each with its cost and how often one call runs it.
    outside = [(op, op_cost(op), _times(site), site) for site in sites for op in site.func.ops
               if op.opcode != "kernel" and op.opcode not in FREE_OPS]
    xla_ops = [op.opcode for op, *_ in outside]
    xla_locs = {op.loc for op, *_ in outside if _eqn_primitive(op.loc)} - fused_locs
    # Op by op: the program before any kernel was formed (attention recognition is the first).
    first = "recognize-attention" if "recognize-attention" in program.stage_names else "fuse"
    before = _sites(program.module_before(first))
    op_by_op = sum(op_cost(op).bytes * _times(site) for site in before for op in site.func.ops)
    fused = sum(op_cost(op).bytes * _times(site) for site in sites for op in site.func.ops)
    # Outside kernels every op is its own kernel (f32 peak: the conservative class).
    time_op_by_op = sum(modeled_time(spec, c.bytes, c.flops, "f32") * _times(site)
                        for site in before for c in (op_cost(op) for op in site.func.ops if op.opcode not in FREE_OPS))
    time_fused = sum(k.modeled_time_s * (1 if k.trips is None else k.trips) for k in kernels) + sum(
        modeled_time(spec, cost.bytes, cost.flops, "f32") * times for _, cost, times, _ in outside)
    fallbacks = []
    for op, cost, times, site in outside:
        if op.opcode == "opaque":
            moved = cost.bytes * times
            fallbacks.append({"primitive": str(op.attr("primitive")), "reason": str(op.attr("reason")),
                              "body": site.body, "bytes": moved, "share": moved / max(fused, 1)})
    return Report(spec.name, program.backend, kernels, program.num_eqns, len(fused_locs), len(xla_locs), xla_ops,
                  fallbacks, op_by_op, fused, time_op_by_op, time_fused, gpu_backend(program.backend))


def gpu_backend(backend: str) -> str:
    """What lowering for cuda emits for ``backend``'s kernels: itself, or for the Triton backend
    where the installed jax-triton cannot lower them, Pallas kernels and the one-line reason."""
    if backend != "triton":
        return backend if backend in ("pallas",) else ""
    from fusec.runtime.triton_call import triton_backend_problem

    problem = triton_backend_problem()
    return "triton" if problem is None else f"pallas (the Triton backend cannot lower for cuda here: {problem})"
