"""Property tests over random well-typed graphs (tests/strategies.py)."""

from __future__ import annotations

import torch
from hypothesis import given
from strategies import RandomGraph, random_graphs

from ember.ir import format_graph, graph_from_json, graph_to_json, run_graph, verify


@given(random_graphs())
def test_random_graphs_verify(rg: RandomGraph) -> None:
    verify(rg.graph)


@given(random_graphs())
def test_json_round_trip_preserves_random_graphs(rg: RandomGraph) -> None:
    g2 = graph_from_json(graph_to_json(rg.graph), rg.graph.weights)
    verify(g2)
    assert format_graph(g2) == format_graph(rg.graph)
    assert graph_to_json(g2) == graph_to_json(rg.graph)


@given(random_graphs())
def test_reference_interpreter_matches_direct_torch(rg: RandomGraph) -> None:
    got = run_graph(rg.graph, *rg.inputs)
    assert len(got) == len(rg.expected)
    for g, want in zip(got, rg.expected):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)
