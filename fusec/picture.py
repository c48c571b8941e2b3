"""A picture of the fused graph: inputs, kernels and XLA ops as boxes, tensors flowing top to bottom.

``fused_graph`` reads the final IR of a program into a small node/edge model; ``to_dot`` writes it
for Graphviz (one cluster per kernel holding its ops); :mod:`fusec.picture_svg` lays it out and
draws it as SVG or a self-contained HTML page, with no external tool.
"""

from __future__ import annotations

from dataclasses import dataclass

from fusec.ir import Function, Module, Value
from fusec.passes.cost import FREE_OPS, nbytes

# One fill colour per kernel (cycled), picked to stay apart from each other and from the grey inputs.
KERNEL_COLORS = ("#cfe2ff", "#d1f2d9", "#ffe5b4", "#e8d5f5", "#ffd6d6", "#d4f0f0", "#fff3b0", "#e0e0ff",
                 "#f5d5e8", "#dff0c8", "#ffdcc2", "#d8e8f8")
INPUT_COLOR, XLA_COLOR, OUTPUT_COLOR = "#eeeeee", "#ffb3b3", "#c8c8c8"


@dataclass(frozen=True)
class Node:
    """One box: ``kind`` is input, kernel, xla or output; ``lines`` are drawn under the title."""

    id: str
    kind: str
    title: str
    lines: tuple[str, ...]
    color: str
    ops: tuple[str, ...] = ()  # a kernel's ops, for the DOT clusters


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    label: str
    nbytes: int


@dataclass(frozen=True)
class Graph:
    name: str
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _tensor_label(v: Value) -> str:
    return f"{v.type} {human_bytes(nbytes(v.type))}"


def _kernel_lines(op_attrs: dict[str, object], func: Function) -> tuple[str, ...]:
    opcodes = [op.opcode for op in func.ops if op.opcode not in FREE_OPS]
    chain, line = [], ""
    for name in opcodes:  # wrap the op chain at ~40 characters so boxes stay narrow
        piece = name if not line else f"{line} > {name}"
        if len(piece) > 40 and line:
            chain.append(line)
            piece = name
        line = piece
    if line:
        chain.append(line)
    read, written = int(op_attrs.get("bytes_read", 0)), int(op_attrs.get("bytes_written", 0))
    io = f"reads {human_bytes(read)}, writes {human_bytes(written)}"
    grid = op_attrs.get("grid")
    return (*chain, io, *([f"grid {list(grid)}"] if isinstance(grid, tuple) else []))


def fused_graph(module: Module) -> Graph:
    """Nodes for the entry's parameters, kernels, XLA ops and results; free ops (reshapes,
    constants) are folded into the edges that pass through them."""
    entry = module.entry
    nodes: list[Node] = []
    edges: dict[tuple[str, str], Edge] = {}
    source: dict[str, str] = {}  # value name -> node id producing it
    for p in entry.params:
        nodes.append(Node(f"in_{p.name}", "input", f"%{p.name}", (_tensor_label(p),), INPUT_COLOR))
        source[p.name] = nodes[-1].id
    kernel_index = 0

    def connect(v: Value, dst: str) -> None:
        src = source.get(v.name)
        if src is not None and (src, dst) not in edges:
            edges[(src, dst)] = Edge(src, dst, _tensor_label(v), nbytes(v.type))

    for op in entry.ops:
        if op.opcode in FREE_OPS:
            # A view of its input (or a constant, drawn only where a kernel reads it).
            if op.operands and op.operands[0].name in source:
                source[op.result.name] = source[op.operands[0].name]
            continue
        if op.opcode == "kernel":
            callee = str(op.attr("callee"))
            func = module.function(callee)
            color = KERNEL_COLORS[kernel_index % len(KERNEL_COLORS)]
            kernel_index += 1
            node = Node(callee, "kernel", f"{callee} ({op.attr('kind')})", _kernel_lines(op.attr_dict, func), color,
                        tuple(o.opcode for o in func.ops))
        else:
            label = str(op.attr("primitive")) if op.opcode == "opaque" else op.opcode
            node = Node(f"xla{len(nodes)}_{op.opcode}", "xla", f"XLA: {label}",
                        tuple(_tensor_label(r) for r in op.results), XLA_COLOR)
        nodes.append(node)
        for v in op.operands:
            connect(v, node.id)
        for r in op.results:
            source[r.name] = node.id
    for i, r in enumerate(entry.returns):
        nodes.append(Node(f"out{i}", "output", f"output {i}", (_tensor_label(r),), OUTPUT_COLOR))
        connect(r, nodes[-1].id)
    used = {e.src for e in edges.values()} | {e.dst for e in edges.values()}
    kept = tuple(n for n in nodes if n.kind != "input" or n.id in used)
    return Graph(entry.name, kept, tuple(edges.values()))


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(graph: Graph) -> str:
    """Graphviz text: a filled box per node, kernels as clusters of their ops, edges labelled with bytes."""
    lines = [f"digraph {_dot_quote(graph.name)} {{", "  rankdir=TB;", '  node [shape=box, style="rounded,filled", '
             'fontname="monospace", fontsize=10];', '  edge [fontname="monospace", fontsize=9];']
    for n in graph.nodes:
        label = "\\n".join([n.title, *n.lines]).replace('"', '\\"')
        if n.kind == "kernel":
            cluster = _dot_quote(f"cluster_{n.id}")
            ops = " -> ".join(_dot_quote(f"{n.id}/{i}") for i in range(len(n.ops)))
            lines.append(f"  subgraph {cluster} {{ style=filled; fillcolor={_dot_quote(n.color)}; "
                         f'label="{label}";')
            for i, opcode in enumerate(n.ops):
                lines.append(f'    {_dot_quote(f"{n.id}/{i}")} [label={_dot_quote(opcode)}, fillcolor="white"];')
            if len(n.ops) > 1:
                lines.append(f"    {ops} [style=invis];")
            lines.append("  }")
        else:
            lines.append(f'  {_dot_quote(n.id)} [label="{label}", fillcolor={_dot_quote(n.color)}];')
    for e in graph.edges:
        lines.append(f"  {_dot_quote(_dot_anchor(graph, e.src, last=True))} -> "
                     f"{_dot_quote(_dot_anchor(graph, e.dst, last=False))} [label={_dot_quote(e.label)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_anchor(graph: Graph, node_id: str, last: bool) -> str:
    """Edges into a kernel cluster land on its first op; edges out leave from its last."""
    node = next(n for n in graph.nodes if n.id == node_id)
    if node.kind == "kernel" and node.ops:
        return f"{node.id}/{len(node.ops) - 1 if last else 0}"
    return node.id
