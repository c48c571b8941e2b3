"""Layered layout and SVG/HTML drawing of a :class:`fusec.picture.Graph`, without Graphviz.

Layers follow the data: a node sits one layer below its lowest producer, and an input sits just
above its first reader, so every edge points down. Within a layer, nodes are ordered by the mean
position of their neighbours (a few up and down sweeps), which keeps crossings few on the
chain-shaped graphs fusion produces.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import networkx as nx

from fusec.picture import Graph, Node

CHAR_W, LINE_H, PAD, H_GAP, V_GAP, LANE_W = 7.2, 16, 8, 28, 56, 4  # pixels, for 12px monospace text


@dataclass(frozen=True)
class Box:
    node: Node
    x: float
    y: float
    w: float
    h: float


def _layers(graph: Graph) -> dict[str, int]:
    """Longest-path layering: each node one layer below its lowest producer (sources at 0 first)."""
    dag = nx.DiGraph()
    dag.add_nodes_from(n.id for n in graph.nodes)
    dag.add_edges_from((e.src, e.dst) for e in graph.edges)
    layer: dict[str, int] = {}
    sources = [n.id for n in graph.nodes if not dag.in_degree(n.id)]
    for nid in nx.topological_sort(dag):  # producers before their readers
        if dag.in_degree(nid):
            layer[nid] = 1 + max(layer.get(p, 0) for p in dag.predecessors(nid))
    # Inputs, and kernels reading nothing (a mask built from iota), sit just above their first reader.
    for nid in reversed(sources):
        layer[nid] = max(min((layer.get(s, 1) for s in dag.successors(nid)), default=1) - 1, 0)
    return layer


def _order(ids: list[str], layer: dict[str, int], links: list[tuple[str, str]]) -> list[list[str]]:
    depth = max(layer.values(), default=0) + 1
    rows: list[list[str]] = [[] for _ in range(depth)]
    for nid in ids:
        rows[layer[nid]].append(nid)
    neighbours: dict[str, list[str]] = {nid: [] for nid in ids}
    for a, b in links:
        neighbours[a].append(b)
        neighbours[b].append(a)
    for sweep in range(8):
        position = {nid: i for row in rows for i, nid in enumerate(row)}
        for row_index in (range(1, depth) if sweep % 2 == 0 else range(depth - 2, -1, -1)):
            row = rows[row_index]
            keys = {}
            for i, nid in enumerate(row):
                near = [position[m] for m in neighbours[nid] if layer[m] != layer[nid]]
                keys[nid] = sum(near) / len(near) if near else float(i)
            row.sort(key=keys.__getitem__)
            position.update({nid: i for i, nid in enumerate(row)})
    return rows


@dataclass(frozen=True)
class Layout:
    """Boxes, the drawing's size, and for each edge crossing rows the lane it takes through each
    row it crosses: (x, top, bottom)."""

    boxes: list[Box]
    width: float
    height: float
    lanes: dict[tuple[str, str], list[tuple[float, float, float]]]


def layout(graph: Graph) -> Layout:
    """Layered positions; an edge spanning several rows gets a lane of its own in each row it
    crosses, so it never runs behind a box."""
    by_id = {n.id: n for n in graph.nodes}
    layer = _layers(graph)
    ids, links, chains = [n.id for n in graph.nodes], [], {}
    for e in graph.edges:
        chain = [f"~{e.src}>{e.dst}@{row}" for row in range(layer[e.src] + 1, layer[e.dst])]
        layer.update({lane: row for lane, row in zip(chain, range(layer[e.src] + 1, layer[e.dst]))})
        ids += chain
        path = [e.src, *chain, e.dst]
        links += list(zip(path, path[1:]))
        chains[(e.src, e.dst)] = chain
    rows = _order(ids, layer, links)
    sizes = {n.id: (PAD * 2 + CHAR_W * max(len(t) for t in (n.title, *n.lines)), PAD * 2 + LINE_H * (1 + len(n.lines)))
             for n in graph.nodes}
    sizes.update({nid: (LANE_W, 0.0) for nid in ids if nid not in by_id})
    widths = [sum(sizes[i][0] for i in row) + H_GAP * max(len(row) - 1, 0) for row in rows]
    total_w = max(widths, default=0) + 2 * H_GAP
    boxes, lane_at, y = [], {}, float(V_GAP / 2)
    for row, row_w in zip(rows, widths):
        x = (total_w - row_w) / 2
        row_h = max((sizes[i][1] for i in row), default=0)
        for nid in row:
            w, h = sizes[nid]
            if nid in by_id:
                boxes.append(Box(by_id[nid], x, y + (row_h - h) / 2, w, h))
            else:
                lane_at[nid] = (x + w / 2, y, y + row_h)
            x += w + H_GAP
        y += row_h + V_GAP
    lanes = {edge: [lane_at[lane] for lane in chain] for edge, chain in chains.items() if chain}
    return Layout(boxes, total_w, y - V_GAP / 2, lanes)


def _text(x: float, y: float, text: str, weight: str = "normal") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-family="monospace" font-size="12" font-weight="{weight}">'
            f"{html.escape(text)}</text>")


def to_svg(graph: Graph) -> str:
    """A standalone SVG document."""
    drawn = layout(graph)
    boxes, width, height, lanes = drawn.boxes, drawn.width, drawn.height, drawn.lanes
    at = {b.node.id: b for b in boxes}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
             f'viewBox="0 0 {width:.0f} {height:.0f}">',
             f"<title>{html.escape(graph.name)}: fused graph</title>",
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>',
             '<rect width="100%" height="100%" fill="white"/>']
    # Edges leave and enter boxes at ports spread along their bottom and top sides, in the order of
    # the box at the other end, so arrows into one box neither meet nor cross at the border.
    out_port, in_port = _ports(graph, at, lanes, outgoing=True), _ports(graph, at, lanes, outgoing=False)
    labels, labelled = [], set()
    for e in graph.edges:
        a, b = at[e.src], at[e.dst]
        x1, y1, x2, y2 = out_port[(e.src, e.dst)], a.y + a.h, in_port[(e.src, e.dst)], b.y
        d, (px, py) = f"M {x1:.1f} {y1:.1f}", (x1, y1)
        for lx, top, bottom in lanes.get((e.src, e.dst), []):
            d += f" {_curve(px, py, lx, top)} L {lx:.1f} {bottom:.1f}"
            px, py = lx, bottom
        d += f" {_curve(px, py, x2, y2)}"
        parts.append(f'<path d="{d}" fill="none" stroke="#555" stroke-width="1.2" marker-end="url(#arrow)">'
                     f"<title>{html.escape(e.label)}</title></path>")
        # Inputs show their size in their box; a kernel's result is labelled once, under the kernel.
        if a.node.kind != "input" and (e.src, e.label) not in labelled:
            labelled.add((e.src, e.label))
            labels.append(f'<text x="{x1 + 4:.1f}" y="{y1 + 14:.1f}" font-family="monospace" font-size="11" '
                          f'fill="#222" stroke="white" stroke-width="3" paint-order="stroke">'
                          f"{html.escape(e.label)}</text>")
    for b in boxes:
        dash = ' stroke-dasharray="5,3"' if b.node.kind == "xla" else ""
        radius = 12 if b.node.kind in ("input", "output") else 4
        parts.append(f'<g class="node {b.node.kind}" id="{html.escape(b.node.id)}">'
                     f'<rect x="{b.x:.1f}" y="{b.y:.1f}" width="{b.w:.1f}" height="{b.h:.1f}" rx="{radius}" '
                     f'fill="{b.node.color}" stroke="#333" stroke-width="1.2"{dash}/>')
        parts.append(_text(b.x + PAD, b.y + PAD + 12, b.node.title, "bold"))
        for i, line in enumerate(b.node.lines):
            parts.append(_text(b.x + PAD, b.y + PAD + 12 + LINE_H * (i + 1), line))
        parts.append("</g>")
    parts.extend(labels)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _curve(x1: float, y1: float, x2: float, y2: float) -> str:
    """A cubic segment leaving and arriving vertically."""
    mid = (y1 + y2) / 2
    return f"C {x1:.1f} {mid:.1f}, {x2:.1f} {mid:.1f}, {x2:.1f} {y2:.1f}"


def _ports(graph: Graph, at: dict[str, Box], lanes: dict[tuple[str, str], list[tuple[float, float, float]]],
           outgoing: bool) -> dict[tuple[str, str], float]:
    ends: dict[str, list[tuple[float, tuple[str, str]]]] = {}
    for e in graph.edges:
        here, there = (e.src, e.dst) if outgoing else (e.dst, e.src)
        lane = lanes.get((e.src, e.dst))
        # Ports are ordered by where the edge heads: its first (or last) lane, else the other box.
        toward = (lane[0][0] if outgoing else lane[-1][0]) if lane else at[there].x + at[there].w / 2
        ends.setdefault(here, []).append((toward, (e.src, e.dst)))
    ports = {}
    for node_id, items in ends.items():
        box = at[node_id]
        for i, (_, key) in enumerate(sorted(items)):
            ports[key] = box.x + box.w * (i + 1) / (len(items) + 1)
    return ports


def to_html(graph: Graph, summary: str = "") -> str:
    """A self-contained page: the SVG, and ``summary`` (the text report) under it."""
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(graph.name)}: fusec fused graph</title>"
            "<style>body{font-family:sans-serif;margin:16px} pre{font-size:12px}</style></head><body>\n"
            f"<h2>{html.escape(graph.name)}: fused graph</h2>\n"
            "<p>Boxes are kernels (one colour each), grey pills are inputs, red dashed boxes are ops XLA runs; "
            "edges carry tensors, labelled with their type and size.</p>\n"
            f"{to_svg(graph)}<pre>{html.escape(summary)}</pre>\n</body></html>\n")
