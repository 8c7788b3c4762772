"""CUDA backend: Ember's Triton kernels for the ops its passes introduce, torch for the rest.

Compiling needs no GPU: kernels are built ahead of time for sm_80 and sm_90 with Triton's
bundled ptxas (see `program`). Running needs one: `available` reports whether this machine can
*run* CUDA programs, `available_for_compile` whether it can *build* them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ember.ir import Graph, Node, has_op

from ..base import Availability, Support
from .program import NO_GPU_REASON, CudaProgram, compile_graph, interpreting, load_program

__all__ = ["CudaBackend", "CudaProgram", "compile_graph", "load_program", "NO_GPU_REASON"]


def _triton() -> tuple[bool, str]:
    try:
        import triton
    except ImportError as e:
        return False, f"triton is not installed ({e}); pip install 'ember[dev]'"
    return True, f"triton {triton.__version__}"


class CudaBackend:
    """The ``cuda`` backend; options of `compile` are those of `compile_graph`."""

    name = "cuda"

    def available(self) -> Availability:
        """Whether CUDA programs can *run* here."""
        ok, what = _triton()
        if not ok:
            return Availability(False, what)
        if not torch.cuda.is_available():
            return Availability(False, NO_GPU_REASON)
        dev = torch.cuda.get_device_name()
        cap = ".".join(map(str, torch.cuda.get_device_capability()))
        return Availability(True, f"{dev} (sm {cap}), {what}")

    def available_for_compile(self) -> Availability:
        """Whether CUDA artifacts can be *built* here (Triton + its ptxas; no GPU needed)."""
        ok, what = _triton()
        if not ok:
            return Availability(False, what)
        from .aot import ptxas_path

        ptxas = ptxas_path()
        if ptxas is None:
            return Availability(False, f"{what} has no usable ptxas to build cubins")
        return Availability(True, f"{what}, ptxas {ptxas}; builds sm_80/sm_90 cubins")

    def supports(self, node: Node) -> Support:
        from .lowering import KERNEL_OPS

        if node.op in KERNEL_OPS:
            return Support(True, "Ember Triton kernel (torch when a kernel precondition fails)")
        if has_op(node.op):
            return Support(True, "torch on CUDA (cuBLAS / ATen)")
        return Support(False, f"op '{node.op}' has no CUDA lowering and no reference")

    def compile(self, graph: Graph, example_inputs: Sequence[torch.Tensor],
                **opts: Any) -> CudaProgram:
        if opts.get("device") == "cpu" and not interpreting():
            from ember.errors import BackendUnavailableError

            raise BackendUnavailableError("cuda backend with device='cpu' needs "
                                          "TRITON_INTERPRET=1 (the Triton interpreter)")
        return compile_graph(graph, example_inputs, **opts)

    def load(self, directory: str | Path, info: Mapping[str, Any], graph: Graph | None = None,
             **opts: Any) -> CudaProgram:
        return load_program(directory, info, graph=graph,
                            allow_native=bool(opts.get("allow_native", True)))
