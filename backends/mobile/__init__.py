"""Mobile backend: Ember IR -> TVM Relax -> aarch64 (NEON) shared library + weights.

``compile`` lowers the graph to Relax (`lowering`), schedules every kernel with rule-based NEON
schedules (`schedules`), builds it for ``aarch64-linux-gnu`` and links it with Debian's cross
g++ (`build`). The payload is ``model.so`` + ``weights.params`` + ``runner.cc`` (`program`);
on this x86 machine the program runs under qemu-aarch64 with the aarch64 TVM runtime.
``setup_toolchain.sh`` installs everything it needs.

Options of `MobileBackend.compile`: ``cpu`` (an entry of `CPUS`, default "generic"),
``schedule`` ("neon" or "none": TVM's untuned default, for comparisons), ``threads``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ember.errors import UnsupportedOpError
from ember.ir import Graph, Node, has_op

from ..base import Availability, Support
from ..registry import register
from .build import CPUS, BuildOptions
from .program import PAYLOAD_FILES, MobileProgram, load_program, new_payload_dir
from .toolchain import SETUP_SCRIPT, TVM_FFI_VERSION, TVM_VERSION, find_toolchain

__all__ = ["MobileBackend", "MobileProgram", "compile_graph", "CPUS", "SETUP_SCRIPT",
           "PAYLOAD_FILES"]

log = logging.getLogger(__name__)


def compile_graph(graph: Graph, example_inputs: Sequence[torch.Tensor], *, cpu: str = "generic",
                  schedule: str = "neon", threads: int = 4) -> MobileProgram:
    """Compiles ``graph`` at the example input shapes into a `MobileProgram`.

    Raises:
        UnsupportedOpError: listing every node TVM cannot convert (nothing is dropped).
        BackendUnavailableError: the cross toolchain or TVM is missing (says what).
    """
    from .build import build, save_tensors
    from .lowering import to_relax

    find_toolchain().require()
    opts = BuildOptions(cpu=cpu, schedule=schedule, threads=threads)
    opts.mattr()  # validates cpu
    t0 = time.perf_counter()
    rm = to_relax(graph, example_inputs, dot4="+dotprod" in opts.mattr())
    lower_s = time.perf_counter() - t0
    out = new_payload_dir()
    res = build(rm, out, opts)
    save_tensors(out / "weights.params", {f"p{i:04d}": w for i, w in enumerate(res.weights)})
    rules: dict[str, int] = {}
    for r in res.scheduled.values():
        rules[r] = rules.get(r, 0) + 1
    info: dict[str, Any] = {
        "backend": "mobile",
        "kind": "tvm-relax-vm",
        "target": res.target,
        "cpu": cpu,
        "schedule": schedule,
        "threads": threads,
        "inputs": [t.to_json() for t in rm.input_types],
        "outputs": [t.to_json() for t in rm.output_types],
        "weights": len(res.weights),
        "files": list(PAYLOAD_FILES),
        "kernels": dict(res.scheduled),
        "rules": rules,
        "build_seconds": {"lower": round(lower_s, 2),
                          **{k: round(v, 2) for k, v in res.seconds.items()}},
        "tvm": TVM_VERSION,
        "tvm_ffi": TVM_FFI_VERSION,
        "reason": f"TVM Relax for aarch64 ({'/'.join(opts.mattr())}), schedules: {schedule}",
    }
    log.info("mobile: compiled %d kernels (%s)", len(res.scheduled),
             ", ".join(f"{k} x{v}" for k, v in rules.items()))
    return MobileProgram(out, info, owned=True)


class MobileBackend:
    """The ``mobile`` backend (one instance: constructing it again returns the same object)."""

    name = "mobile"
    _instance: MobileBackend | None = None

    def __new__(cls) -> MobileBackend:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def available(self) -> Availability:
        tc = find_toolchain()
        return Availability(tc.ok, tc.reason())

    def supports(self, node: Node) -> Support:
        if not has_op(node.op):
            return Support(False, f"op '{node.op}' is not registered")
        if not find_toolchain().can_compile:
            return Support(False, "TVM / the aarch64 toolchain is not installed")
        from .lowering import probe_node

        why = probe_node(node)
        return Support(not why, why)

    def compile(self, graph: Graph, example_inputs: Sequence[torch.Tensor],
                **opts: Any) -> MobileProgram:
        try:
            return compile_graph(graph, example_inputs, **opts)
        except UnsupportedOpError:
            raise
        except TypeError as e:
            if "unexpected keyword" in str(e):
                raise TypeError(f"mobile backend options are cpu=, schedule=, threads=: {e}") \
                    from e
            raise

    def load(self, directory: str | Path, info: Mapping[str, Any], graph: Graph | None = None,
             **opts: Any) -> MobileProgram:
        return load_program(directory, info)


register(MobileBackend())
