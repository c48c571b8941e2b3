"""fusec/ir/graph.py: networkx views of the IR and the order-keeping topological sort fusion uses."""

from __future__ import annotations

import networkx as nx
import pytest

from fusec.ir.graph import stable_toposort


def test_stable_toposort_keeps_the_given_order_where_edges_allow() -> None:
    graph = nx.DiGraph([(3, 0), (2, 1)])
    graph.add_nodes_from(range(5))
    assert stable_toposort(graph, {i: i for i in range(5)}) == [2, 1, 3, 0, 4]
    assert stable_toposort(graph, {i: -i for i in range(5)}) == [4, 3, 2, 1, 0]


def test_stable_toposort_rejects_a_cycle() -> None:
    with pytest.raises(ValueError, match="cycle"):
        stable_toposort(nx.DiGraph([(0, 1), (1, 0)]), {0: 0, 1: 1})
