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


_MAX_ATTR_DEPTH = 32


def attr_from_json(v: Any, where: str = "attribute", _depth: int = 0) -> Any:
    """An attribute value from JSON; ``$dim`` strings go through the strict dim grammar."""
    if _depth > _MAX_ATTR_DEPTH:
        raise ValueError(f"{where}: nested too deeply")
    if isinstance(v, list):
        return tuple(attr_from_json(x, where, _depth + 1) for x in v)
    if isinstance(v, dict):
        if "$dim" in v:
            return dim_from_json(v["$dim"], where)
        if "$float" in v:
            if v["$float"] not in ("nan", "inf", "-inf"):
                raise ValueError(f"{where}: $float must be nan, inf or -inf")
            return float(v["$float"])
        if "$map" in v and isinstance(v["$map"], dict):
            return {str(k): attr_from_json(x, where, _depth + 1) for k, x in v["$map"].items()}
        raise ValueError(f"{where}: an object attribute must be $dim, $float or $map")
    if v is None or isinstance(v, bool | int | float | str):
        return v
    raise ValueError(f"{where}: unsupported attribute value of type {type(v).__name__}")


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


def _field(d: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
    if key not in d:
        raise ValueError(f"{where}: field '{key}' is missing")
    v = d[key]
    if not isinstance(v, kind):
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ValueError(f"{where}: field '{key}' must be {want}, got {type(v).__name__}")
    return v


def graph_from_json(d: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> Graph:
    """Rebuilds a graph from `graph_to_json`'s document, checking every field's type.

    Raises:
        ValueError: naming the node or value and the field that is malformed (nothing in the
            document is evaluated; op names must be registered ops).
    """
    from .ops import has_op

    if not isinstance(d, Mapping) or d.get("format") != "ember-ir":
        raise ValueError("not an Ember IR document (missing format: ember-ir)")
    if d.get("version") != IR_FORMAT_VERSION:
        raise ValueError(f"IR format version {str(d.get('version'))[:20]} is not supported "
                         f"(this Ember reads version {IR_FORMAT_VERSION})")

    vals: dict[str, Value] = {}

    def mk(x: Any, where: str) -> Value:
        name = _field(x, "name", str, where)
        if name in vals:
            raise ValueError(f"{where}: value '{name[:60]}' is defined twice")
        v = Value(name, TensorType.from_json(_field(x, "type", dict, where),
                                             f"{where} ('{name[:60]}')"))
        vals[name] = v
        return v

    def ref(nm: Any, where: str) -> Value:
        if not isinstance(nm, str) or nm not in vals:
            raise ValueError(f"{where}: '{str(nm)[:60]}' is not a value defined before it")
        return vals[nm]

    inputs = tuple(mk(x, f"input {i}") for i, x in enumerate(_field(d, "inputs", list, "ir")))
    params = tuple(mk(x, f"param {i}") for i, x in enumerate(_field(d, "params", list, "ir")))
    nodes = []
    for i, nd in enumerate(_field(d, "nodes", list, "ir")):
        where = f"node {i}"
        op = _field(nd, "op", str, where)
        where = f"node {i} ({op[:40]})"
        if not has_op(op):
            raise ValueError(f"{where}: unknown op '{op[:40]}'")
        ins = tuple(None if nm is None else ref(nm, f"{where} input {j}")
                    for j, nm in enumerate(_field(nd, "inputs", list, where)))
        attrs = {str(k): attr_from_json(x, f"{where} attribute '{str(k)[:40]}'")
                 for k, x in _field(nd, "attrs", dict, where).items()}
        loc = nd.get("loc")
        if loc is not None and not (isinstance(loc, dict) and
                                    all(isinstance(k, str) and isinstance(v, str | int)
                                        for k, v in loc.items())):
            raise ValueError(f"{where}: field 'loc' is malformed")
        try:
            sloc = SourceLoc.from_json(loc)
        except TypeError as e:
            raise ValueError(f"{where}: field 'loc' is malformed ({e})") from None
        outs = tuple(mk(x, f"{where} output {j}")
                     for j, x in enumerate(_field(nd, "outputs", list, where)))
        nodes.append(Node(op, ins, outs, attrs, sloc))
    missing = [p.name for p in params if p.name not in weights]
    if missing:
        raise ValueError(f"weights missing for params: {', '.join(missing[:5])}")
    outputs = tuple(ref(n, f"output {i}") for i, n in enumerate(_field(d, "outputs", list, "ir")))
    names = {}
    for key in ("input_names", "output_names"):
        v = d.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ValueError(f"ir: field '{key}' must be a list of strings")
        names[key] = tuple(v)
    name = d.get("name", "main")
    meta = d.get("meta", {})
    if not isinstance(name, str) or not isinstance(meta, dict):
        raise ValueError("ir: fields 'name'/'meta' are malformed")
    return Graph(
        inputs, params, tuple(nodes), outputs,
        {p.name: weights[p.name] for p in params}, name,
        names["input_names"], names["output_names"],
        {str(k): attr_from_json(x, f"meta '{str(k)[:40]}'") for k, x in meta.items()},
    )


def dumps(g: Graph) -> str:
    return json.dumps(graph_to_json(g), indent=1)
