"""networkx views of a function: ops as nodes, def-use edges."""

from __future__ import annotations

import networkx as nx

from fusec.ir.function import Function


def op_graph(func: Function) -> nx.DiGraph:
    """A DiGraph over op indices with an edge producer -> consumer for each def-use pair."""
    graph = nx.DiGraph()
    graph.add_nodes_from(range(len(func.ops)))
    producer = {r.name: i for i, op in enumerate(func.ops) for r in op.results}
    for i, op in enumerate(func.ops):
        for v in op.operands:
            if v.name in producer:
                graph.add_edge(producer[v.name], i)
    return graph


def stable_toposort(graph: nx.DiGraph, order: dict) -> list:
    """A topological order of ``graph`` that follows ``order`` (node -> rank) wherever it can."""
    try:
        return list(nx.lexicographical_topological_sort(graph, key=order.__getitem__))
    except nx.NetworkXUnfeasible:
        raise ValueError("graph has a cycle") from None
