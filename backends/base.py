"""The backend interface: availability, per-node support, compile, load.

A backend turns a (lowered, verified) IR graph into a `Program`: a callable
``(*tensors) -> list[Tensor]`` with a JSON-able ``info`` dict and a ``save(dir)`` that writes its
payload files into an artifact directory. ``Backend.load(dir, info)`` rebuilds the program from
those files and the ``info`` the artifact manifest recorded; it never unpickles anything.

The artifact writer owns ``ir.json`` and ``weights.safetensors``; backends whose payload is the
IR itself (the reference interpreter, the CPU backend's eager kind) write nothing extra and read
those two files back through `read_artifact_graph`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from ember.errors import ArtifactError
from ember.ir import Graph, Node, graph_from_json

__all__ = [
    "Availability",
    "Support",
    "Program",
    "Backend",
    "read_artifact_graph",
    "IR_FILE",
    "WEIGHTS_FILE",
]

IR_FILE = "ir.json"
WEIGHTS_FILE = "weights.safetensors"


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here; ``reason`` says why not (or what it found)."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class Support:
    """Whether a backend supports one node; ``reason`` names what is missing."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


@runtime_checkable
class Program(Protocol):
    """A compiled graph: call it with the graph's inputs, get its outputs."""

    info: dict[str, Any]

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]: ...

    def save(self, directory: str | Path) -> list[str]:
        """Writes the payload into ``directory``; returns the relative file names written."""
        ...


@runtime_checkable
class Backend(Protocol):
    """One code generator. Heavy imports happen inside `available` / `compile`."""

    name: str

    def available(self) -> Availability: ...

    def supports(self, node: Node) -> Support: ...

    def compile(self, graph: Graph, example_inputs: Sequence[torch.Tensor],
                **opts: Any) -> Program: ...

    def load(self, directory: str | Path, info: Mapping[str, Any], **opts: Any) -> Program: ...


def read_artifact_graph(directory: str | Path) -> Graph:
    """Reads ``ir.json`` + ``weights.safetensors`` written by the artifact writer."""
    from safetensors.torch import load_file

    d = Path(directory)
    ir_path, w_path = d / IR_FILE, d / WEIGHTS_FILE
    for p in (ir_path, w_path):
        if not p.is_file():
            raise ArtifactError(f"artifact file missing: {p}")
    try:
        doc = json.loads(ir_path.read_text())
        return graph_from_json(doc, load_file(str(w_path)))
    except (ValueError, KeyError) as e:
        raise ArtifactError(f"cannot read the IR in {d}: {e}") from e
