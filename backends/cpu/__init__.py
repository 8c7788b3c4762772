"""CPU backend: IR -> fx program -> torch.export -> AOTInductor (C++/OpenMP, oneDNN GEMMs),
or IR -> ONNX -> ONNX Runtime (`onnx`: the exporter, its emitters and fusion stage, sessions;
`ort_tuning`: per-machine export choices), whichever is measured faster; `gate` answers the
passes' speed questions (`ember.passmanager.TargetGate`) in that runtime."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ember.ir import Graph, Node, has_op

from ..base import Availability, Support
from .lowering import LOWERINGS, lower_graph, register_lowering
from .program import CpuProgram, compile_graph, find_pickles, load_program

__all__ = [
    "CpuBackend",
    "CpuProgram",
    "compile_graph",
    "load_program",
    "lower_graph",
    "register_lowering",
    "LOWERINGS",
    "find_pickles",
]


class CpuBackend:
    """The ``cpu`` backend; options of `compile` are those of `compile_graph`."""

    name = "cpu"

    def available(self) -> Availability:
        try:
            from torch._inductor import aoti_compile_and_package  # noqa: F401
        except ImportError as e:
            return Availability(False, f"torch {torch.__version__} lacks AOTInductor: {e}")
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            cxx = get_cpp_compiler()
        except Exception as e:  # no C++ compiler: only the eager kind could run
            return Availability(False, f"no C++ compiler for AOTInductor: {e}")
        return Availability(True, f"AOTInductor with {cxx}, {torch.get_num_threads()} threads")

    def supports(self, node: Node) -> Support:
        if node.op in LOWERINGS or has_op(node.op):
            return Support(True)
        return Support(False, f"op '{node.op}' has no CPU lowering and no reference")

    def compile(self, graph: Graph, example_inputs: Sequence[torch.Tensor],
                **opts: Any) -> CpuProgram:
        return compile_graph(graph, example_inputs, **opts)

    def load(self, directory: str | Path, info: Mapping[str, Any], graph: Graph | None = None,
             **opts: Any) -> CpuProgram:
        return load_program(directory, info, graph=graph,
                            allow_native=bool(opts.get("allow_native", True)))
