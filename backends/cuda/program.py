"""Compile an IR graph for CUDA without needing a GPU, and load it back on one.

``compile_graph`` plans every node (Ember kernel or torch), lowers the graph to an fx module,
runs that module once on *meta* tensors while recording every kernel launch, and builds each
recorded specialization ahead of time for sm_80 and sm_90 (cubin + PTX, `aot.build_kernels`).
The payload (``payload/``)::

    kernels/manifest.json   every specialization: kernel, signature, constexprs, warps,
                            stages, and its cubin/PTX/metadata per architecture
    kernels/*.cubin|ptx|json
    kernels/src/*.py        the Triton sources the binaries were built from
    plan.json               per node: kernel or torch, why, predicted latency (H100, A100)

The torch part needs no payload: it is rebuilt from the artifact's ``ir.json`` by the same
lowering. On a GPU, `load_program` moves the module to CUDA and launches the cubins of the
device's architecture (sm_90 on Hopper, sm_80 on Ampere/Ada), falling back to the Triton JIT for
any specialization the build did not cover.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ember.errors import ArtifactError, BackendUnavailableError
from ember.ir import Graph, to_torch_dtype

from ..base import read_artifact_graph
from .aot import DEFAULT_ARCHS, build_kernels
from .launch import KernelSpec, KernelTable, record_launches, use_kernel_table
from .lowering import NodePlan, lower_graph, plan_graph

__all__ = ["CudaProgram", "compile_graph", "load_program", "record_specs", "NO_GPU_REASON",
           "interpreting"]

log = logging.getLogger(__name__)

NO_GPU_REASON = "no CUDA device: torch.cuda.is_available() is False"
_KDIR = "kernels"


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class CudaProgram:
    """A compiled CUDA program: ``program(*tensors) -> list[Tensor]`` on a GPU.

    Outputs come back on the device of the first input (CPU inputs are copied to the GPU and
    the results back). ``device="cpu"`` runs the same module on CPU tensors through the Triton
    interpreter (tests only: it needs ``TRITON_INTERPRET=1``).
    """

    def __init__(self, graph: Graph, module: torch.fx.GraphModule | None, info: dict[str, Any],
                 payload: Path | None, device: str = "cuda",
                 table: KernelTable | None = None) -> None:
        self.graph = graph
        self.info = info
        self.device = device
        self._module = module
        self._payload = payload
        self._table = table
        self._on_device = False

    def _check_runnable(self) -> None:
        if self.device == "cpu":
            if not interpreting():
                raise BackendUnavailableError(
                    "cuda program on device='cpu' needs TRITON_INTERPRET=1 set before triton "
                    "is imported (the Triton interpreter)")
            return
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"this CUDA program cannot run here ({NO_GPU_REASON}); its artifact holds "
                f"sm_80/sm_90 cubins for a GPU machine; load it with fallback='reference' to "
                f"run its IR on the CPU")

    def __call__(self, *args: Any) -> list[torch.Tensor]:
        self._check_runnable()
        assert self._module is not None
        if not self._on_device:
            self._module.to(self.device)
            self._on_device = True
        back = args[0].device if args and isinstance(args[0], torch.Tensor) else None
        ins = []
        for a, v in zip(args, self.graph.inputs):
            t = a if isinstance(a, torch.Tensor) else torch.as_tensor(a)
            ins.append(t.to(device=self.device, dtype=to_torch_dtype(v.type.dtype)))
        with torch.inference_mode(), use_kernel_table(self._table):
            out = self._module(*ins)
        if back is not None and back.type != self.device:
            return [o.to(back) for o in out]
        return list(out)

    def save(self, directory: str | Path) -> list[str]:
        """Copies the payload (kernel binaries, sources, manifest, plan) into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if self._payload is None:
            return []
        names = []
        for p in sorted(self._payload.rglob("*")):
            if p.is_file():
                rel = p.relative_to(self._payload)
                dst = d / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                if p.resolve() != dst.resolve():
                    shutil.copyfile(p, dst)
                names.append(rel.as_posix())
        return names

    def __repr__(self) -> str:
        return f"CudaProgram(device={self.device!r}, kernels={self.info.get('kernels', 0)})"


def _meta_like(t: Any) -> torch.Tensor:
    t = t if isinstance(t, torch.Tensor) else torch.as_tensor(t)
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def record_specs(g: Graph, plans: Sequence[NodePlan], example_inputs: Sequence[Any],
                 options: Mapping[str, Any]) -> list[KernelSpec]:
    """Every kernel specialization the graph launches at the example shapes (all M buckets),
    found by running the lowered module on meta tensors (CPU tensors when an op has no meta
    implementation) with launches recorded instead of run."""
    ins = [_meta_like(t).to(to_torch_dtype(v.type.dtype)) for t, v in zip(example_inputs,
                                                                          g.inputs)]
    gm = lower_graph(g, plans, options).to("meta")
    try:
        with record_launches() as specs, torch.no_grad():
            gm(*ins)
        return list(specs)
    except (NotImplementedError, RuntimeError) as e:
        log.info("meta recording failed (%s); recording on CPU tensors",
                 str(e).splitlines()[0][:200])
    gm = lower_graph(g, plans, options)
    cpu = [torch.zeros(t.shape, dtype=t.dtype) for t in ins]
    with record_launches() as specs, torch.no_grad():
        gm(*cpu)
    return list(specs)


def _plan_json(g: Graph, plans: Sequence[NodePlan], symbols: Mapping[str, int],
               tf32: bool) -> list[dict[str, Any]]:
    from ember.cost_models import get_device

    from .costs import node_estimate

    devs = {name: get_device(name) for name in ("h100", "a100")}
    out = []
    for n, p in zip(g.nodes, plans):
        rec = p.to_json()
        for name, dev in devs.items():
            try:
                est = node_estimate(n, dev, symbols, kernel=p.impl == "kernel", tf32=tf32)
                rec[f"{name}_us"] = round(float(est.latency_s) * 1e6, 3)
            except Exception as e:  # noqa: BLE001  (estimates are advisory)
                log.debug("no estimate for %s: %s", n.op, e)
        out.append(rec)
    return out


def compile_graph(g: Graph, example_inputs: Sequence[Any], *,
                  archs: Sequence[int] = DEFAULT_ARCHS, device: str = "cuda",
                  tf32: bool = False, aot: bool = True, workdir: str | Path | None = None,
                  **_: Any) -> CudaProgram:
    """Compiles ``g`` for CUDA; needs Triton (and its bundled ptxas), not a GPU.

    Args:
        g: a verified IR graph.
        example_inputs: one per graph input; only their shapes and dtypes are used.
        archs: compute capabilities to build cubins for (80: A100 class, 90: H100 class).
        device: "cuda", or "cpu" to run the program through the Triton interpreter (tests).
        tf32: let fp32 GEMMs/attention use TF32 tensor cores (faster, ~1e-3 relative error).
        aot: build the cubins (False: the program JITs on first use; nothing is stored).
        workdir: where the payload is assembled (a temporary directory by default).
    """
    t0 = time.perf_counter()
    options = {"tf32": tf32}
    plans = plan_graph(g)
    gm = lower_graph(g, plans, options)
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="ember_cuda_"))
    work.mkdir(parents=True, exist_ok=True)
    from ember.cost_models import symbols_from_inputs

    try:
        symbols = symbols_from_inputs(g, list(example_inputs)) if example_inputs else {}
    except Exception:  # noqa: BLE001  (the plan's estimates then use unbound symbols)
        symbols = {}
    manifest: dict[str, Any] = {"kernels": [], "archs": []}
    if aot:
        specs = record_specs(g, plans, example_inputs, options)
        kdir = work / _KDIR
        built = build_kernels(specs, archs, kdir)
        for entry in built.get("kernels", []):
            entry["binaries"] = {a: {kind: f"{_KDIR}/{f}" for kind, f in r["files"].items()}
                                 for a, r in entry["archs"].items()}
        manifest = {**built, "format": "ember-cuda-kernels-1"}
        src = kdir / "src"
        src.mkdir(parents=True, exist_ok=True)
        for py in sorted((Path(__file__).parent / "kernels").glob("*.py")):
            shutil.copyfile(py, src / py.name)
        (kdir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    plan = _plan_json(g, plans, symbols, tf32)
    (work / "plan.json").write_text(json.dumps({"symbols": symbols, "nodes": plan}, indent=1))
    import triton

    n_kernel = sum(1 for p in plans if p.impl == "kernel")
    info: dict[str, Any] = {
        "backend": "cuda", "kind": "triton-aot" if aot else "triton-jit", "chosen": "cuda",
        "why": f"{n_kernel} of {len(plans)} nodes on Ember Triton kernels, the rest torch",
        "archs": manifest.get("archs", []), "kernels": len(manifest.get("kernels", [])),
        "triton": triton.__version__, "torch": torch.__version__, "tf32": tf32,
        "built_with_gpu": torch.cuda.is_available(),
        "plan": [{"op": p["op"], "impl": p["impl"], "kernels": p["kernels"],
                  "h100_us": p.get("h100_us")} for p in plan],
        "predicted_h100_us": round(sum(p.get("h100_us") or 0.0 for p in plan), 3),
        "compile_s": round(time.perf_counter() - t0, 3),
    }
    log.info("cuda backend: %s; %d kernel builds in %.1f s", info["why"], info["kernels"],
             info["compile_s"])
    table = None
    return CudaProgram(g, gm, info, work, device=device, table=table)


def load_program(directory: str | Path, info: Mapping[str, Any],
                 graph: Graph | None = None, allow_native: bool = True) -> CudaProgram:
    """Rebuilds a saved CUDA program on this machine's GPU (raises without one).

    With ``allow_native=False`` (an untrusted artifact) the payload's cubins are not loaded:
    the kernels are generated again from the IR (Triton JIT), as when no cubin matches."""
    if not torch.cuda.is_available():
        raise BackendUnavailableError(f"cannot load a CUDA program here: {NO_GPU_REASON}")
    d = Path(directory)
    g = graph if graph is not None else read_artifact_graph(d.parent)
    gm = lower_graph(g, None, {"tf32": bool(info.get("tf32", False))})
    table = None
    mpath = d / _KDIR / "manifest.json"
    if mpath.is_file() and allow_native:
        major, minor = torch.cuda.get_device_capability()
        arch = 90 if major == 9 else 80 if major == 8 else major * 10 + minor
        try:
            table = KernelTable.from_payload(d, json.loads(mpath.read_text()), arch)
        except (OSError, ValueError, KeyError) as e:
            raise ArtifactError(f"cuda payload {d}: unreadable kernel manifest ({e})") from e
        if not table.kernels:
            log.warning("no cubins for sm_%d in %s; kernels will JIT", arch, d)
    return CudaProgram(g, gm, dict(info), d, device="cuda", table=table)
