"""Reference backend: the IR's own evaluator (`ember.ir.interpret`) as a backend program.

It needs no hardware and supports every registered op; each op runs its eager-torch reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ember.ir import Graph, Interpreter, Node, has_op

from ..base import Availability, Support, read_artifact_graph

__all__ = ["ReferenceBackend", "ReferenceProgram"]


class ReferenceProgram:
    """The interpreter as a `Program`. Its payload is the artifact's ir.json + weights."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self._interp = Interpreter(graph)
        self.info: dict[str, Any] = {"backend": "reference", "kind": "interpreter",
                                     "torch": torch.__version__}

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        with torch.inference_mode():
            return self._interp(*args)

    def save(self, directory: str | Path) -> list[str]:
        # the artifact writer already stores ir.json and weights.safetensors
        Path(directory).mkdir(parents=True, exist_ok=True)
        return []


class ReferenceBackend:
    """Always available; supports every registered op."""

    name = "reference"

    def available(self) -> Availability:
        return Availability(True, "eager torch interpreter")

    def supports(self, node: Node) -> Support:
        if has_op(node.op):
            return Support(True)
        return Support(False, f"op '{node.op}' is not registered")

    def compile(self, graph: Graph, example_inputs: Sequence[torch.Tensor] = (),
                **opts: Any) -> ReferenceProgram:
        return ReferenceProgram(graph)

    def load(self, directory: str | Path, info: Mapping[str, Any],
             graph: Graph | None = None, **opts: Any) -> ReferenceProgram:
        return ReferenceProgram(graph if graph is not None else read_artifact_graph(directory))
