"""JSON round-trip of the IR (weights travel separately, in safetensors)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import sympy
import torch

from .graph import Graph, Node, SourceLoc, Value
from .shapes import dim_from_json
from .types import TensorType

__all__ = ["graph_to_json", "graph_from_json", "IR_FORMAT_VERSION", "attr_to_json",
           "attr_from_json"]

IR_FORMAT_VERSION = 1


def attr_to_json(v: Any) -> Any:
    if isinstance(v, bool | str | None.__class__):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            return {"$float": repr(v)}
        return v
    if isinstance(v, sympy.Basic):
        return {"$dim": str(v)}
    if isinstance(v, list | tuple):
        return [attr_to_json(x) for x in v]
    if isinstance(v, Mapping):
        return {"$map": {str(k): attr_to_json(x) for k, x in v.items()}}
    raise TypeError(f"attribute value {v!r} ({type(v).__name__}) is not serializable")


def attr_from_json(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(attr_from_json(x) for x in v)
    if isinstance(v, dict):
        if "$dim" in v:
            return dim_from_json(v["$dim"])
        if "$float" in v:
            return float(v["$float"])
        if "$map" in v:
            return {k: attr_from_json(x) for k, x in v["$map"].items()}
    return v


def _val(v: Value) -> dict:
    return {"name": v.name, "type": v.type.to_json()}


def graph_to_json(g: Graph) -> dict:
    return {
        "format": "ember-ir",
        "version": IR_FORMAT_VERSION,
        "name": g.name,
        "inputs": [_val(v) for v in g.inputs],
        "input_names": list(g.input_names),
        "params": [_val(v) for v in g.params],
        "nodes": [
            {
                "op": n.op,
                "inputs": [None if v is None else v.name for v in n.inputs],
                "outputs": [_val(v) for v in n.outputs],
                "attrs": {k: attr_to_json(x) for k, x in n.attrs.items()},
                **({"loc": n.loc.to_json()} if n.loc.to_json() else {}),
            }
            for n in g.nodes
        ],
        "outputs": [v.name for v in g.outputs],
        "output_names": list(g.output_names),
        "meta": {k: attr_to_json(x) for k, x in g.meta.items()},
    }


def graph_from_json(d: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> Graph:
    if d.get("format") != "ember-ir":
        raise ValueError("not an Ember IR document (missing format: ember-ir)")
    if d.get("version") != IR_FORMAT_VERSION:
        raise ValueError(f"IR format version {d.get('version')} is not supported "
                         f"(this Ember reads version {IR_FORMAT_VERSION})")

    def mk(x: Mapping[str, Any]) -> Value:
        return Value(x["name"], TensorType.from_json(x["type"]))

    vals: dict[str, Value] = {}
    inputs = tuple(mk(x) for x in d["inputs"])
    params = tuple(mk(x) for x in d["params"])
    for v in (*inputs, *params):
        vals[v.name] = v
    nodes = []
    for nd in d["nodes"]:
        outs = tuple(mk(x) for x in nd["outputs"])
        ins = tuple(None if nm is None else vals[nm] for nm in nd["inputs"])
        attrs = {k: attr_from_json(x) for k, x in nd["attrs"].items()}
        nodes.append(Node(nd["op"], ins, outs, attrs, SourceLoc.from_json(nd.get("loc"))))
        for v in outs:
            vals[v.name] = v
    missing = [p.name for p in params if p.name not in weights]
    if missing:
        raise ValueError(f"weights missing for params: {', '.join(missing[:5])}")
    return Graph(
        inputs, params, tuple(nodes), tuple(vals[n] for n in d["outputs"]),
        {p.name: weights[p.name] for p in params}, d.get("name", "main"),
        tuple(d.get("input_names", [])), tuple(d.get("output_names", [])),
        {k: attr_from_json(x) for k, x in d.get("meta", {}).items()},
    )


def dumps(g: Graph) -> str:
    return json.dumps(graph_to_json(g), indent=1)
