"""The fused-graph picture: every edge points down, boxes never overlap, every kernel is drawn."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusec
from fusec.picture import fused_graph, to_dot
from fusec.picture_svg import layout
from tests.corpus import CORPUS


def _check_layout(module) -> None:
    graph = fused_graph(module)
    drawn = layout(graph)
    boxes, width, height = drawn.boxes, drawn.width, drawn.height
    at = {b.node.id: b for b in boxes}
    assert len(boxes) == len(graph.nodes)
    for e in graph.edges:  # data flows one way: each edge leaves a box above the one it enters
        assert at[e.src].y + at[e.src].h < at[e.dst].y, e
        lanes = drawn.lanes.get((e.src, e.dst), [])
        # A long edge passes each row between its ends in a lane of its own, clear of every box.
        rows_between = {b.y + b.h / 2 for b in boxes if at[e.src].y + at[e.src].h < b.y and b.y + b.h < at[e.dst].y}
        assert len(lanes) >= (1 if rows_between else 0)
        for x, top, bottom in lanes:
            assert at[e.src].y < top <= bottom < at[e.dst].y
            assert not any(b.x <= x <= b.x + b.w and b.y < bottom and top < b.y + b.h for b in boxes), (e, x)
    for a in boxes:
        assert 0 <= a.x and a.x + a.w <= width and 0 <= a.y and a.y + a.h <= height
        for b in boxes:
            if a is not b:
                assert a.x + a.w <= b.x or b.x + b.w <= a.x or a.y + a.h <= b.y or b.y + b.h <= a.y
    kernels = [op for op in module.entry.ops if op.opcode == "kernel"]
    assert sorted(n.id for n in graph.nodes if n.kind == "kernel") == sorted(str(k.attr("callee")) for k in kernels)
    assert to_dot(graph).count("subgraph ") == len(kernels)


@pytest.mark.parametrize("case", CORPUS[::4], ids=lambda c: c.name)
def test_layout_of_corpus_programs(case) -> None:
    args = case.make_args(jnp.float32, np.random.default_rng(0))
    lowered = fusec.jit(case.fn, backend="pallas", interpret=True, static_argnums=case.static_argnums).lower(*args)
    _check_layout(lowered.program.module)


def test_xla_ops_and_inputs_are_drawn() -> None:
    def f(x, w):
        return jax.lax.round(x @ w) + 1.0  # round stays an XLA op between two kernels

    module = fusec.jit(f, backend="pallas", interpret=True).lower(jnp.ones((8, 16)), jnp.ones((16, 8))).program.module
    graph = fused_graph(module)
    kinds = sorted(n.kind for n in graph.nodes)
    assert kinds.count("xla") == 1 and kinds.count("input") == 2 and kinds.count("output") == 1
    assert [n.title for n in graph.nodes if n.kind == "xla"] == ["XLA: round"]
    _check_layout(module)
