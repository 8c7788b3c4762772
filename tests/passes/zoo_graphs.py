"""Zoo models imported through the FX frontend, cached on disk between test runs.

Importing a transformer takes tens of seconds here, so imported graphs are cached (IR JSON plus
weights) under pytest's cache dir, keyed by the sources of the frontend, the IR and the zoo.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ember.ir import Graph, graph_from_json, graph_to_json

__all__ = ["zoo_graph", "eager_outputs"]

_ROOT = Path(__file__).resolve().parents[2]
_MEMO: dict[str, tuple[Any, Graph]] = {}


def _source_key() -> str:
    h = hashlib.sha256()
    files = [f for f in sorted((_ROOT / "compiler" / "frontends").glob("*.py"))
             if "onnx" not in f.name]  # the FX import does not depend on the ONNX loader
    files += sorted((_ROOT / "compiler" / "ir").glob("*.py")) + [_ROOT / "tests" / "zoo.py"]
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


def zoo_graph(name: str, cache_dir: Path | None = None) -> tuple[Any, Graph]:
    """(ZooModel, imported Graph) for zoo model ``name`` (small size)."""
    import zoo

    from ember.frontends.fx import import_module

    if name in _MEMO:
        return _MEMO[name]
    zm = zoo.get(name)
    path = None if cache_dir is None else cache_dir / f"{name}-{_source_key()}"
    if path is not None and (path / "ir.json").exists():
        g = graph_from_json(json.loads((path / "ir.json").read_text()),
                            torch.load(path / "weights.pt", weights_only=True))
    else:
        g = import_module(zm.model, zm.example_inputs, dynamic_dims=zm.dynamic_dims)
        if path is not None:
            path.mkdir(parents=True, exist_ok=True)
            torch.save(dict(g.weights), path / "weights.pt")
            (path / "ir.json").write_text(json.dumps(graph_to_json(g)))
    _MEMO[name] = (zm, g)
    return zm, g


def eager_outputs(zm: Any, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The eager model's outputs flattened the way the frontend orders graph outputs."""
    with torch.no_grad():
        out = zm.model(*inputs)
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in out if isinstance(t, torch.Tensor)]


def check_o2(name: str, cache_dir: Path | None, **dims: int) -> tuple[Graph, Graph, Any]:
    """Runs O2 (verifying after every pass) on zoo model ``name``; checks numerics.

    The optimized graph must match the imported graph (1e-5 of the output scale) and the
    eager model (1e-4) on fresh inputs with symbol values ``dims``. Returns (before, after,
    PassContext).
    """
    from helpers import assert_close_outputs, run_pass

    from ember.ir import run_graph
    from ember.passmanager import PassContext

    zm, g = zoo_graph(name, cache_dir)
    ctx = PassContext()
    out = run_pass(g, "O2", ctx)
    inputs = zm.make_inputs(**dims)
    ref = run_graph(g, *inputs)
    got = run_graph(out, *inputs)
    assert_close_outputs(ref, got, rtol=1e-5)
    eager = eager_outputs(zm, inputs)[: len(got)]
    assert_close_outputs(eager, got, rtol=1e-4)
    assert len(out.nodes) < len(g.nodes)
    return g, out, ctx


def hits(ctx: Any, pass_name: str) -> dict[str, int]:
    return dict(ctx.records.get(pass_name, {}).get("hits", {}))
