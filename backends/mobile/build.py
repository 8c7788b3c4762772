"""Relax -> aarch64 shared library + weights.

Pipeline (``build``):

1. ``LiftTransformParams``: weight-only computations (the transposes of linear weights, the
   layout change of conv kernels) move into ``main_transform_params``, which is compiled for
   this machine and run once here: the weights file holds the transformed weights, and the
   phone never transposes a weight.
2. ``main``: legalize to TensorIR, fold, fuse, then the schedule rules of `schedules` (tiled,
   register-blocked, NEON-vectorized GEMM/conv, vectorized elementwise and reductions). With
   ``schedule="none"`` this step is skipped: TVM's untuned default (the baseline the
   instruction-count check compares with).
3. Built for ``llvm -mtriple=aarch64-linux-gnu -mattr=+neon[,+dotprod]`` and linked into a
   shared library with Debian's ``aarch64-linux-gnu-g++``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ember.errors import CompilerError

from .lowering import RelaxModel
from .toolchain import CROSS_CXX

__all__ = ["BuildOptions", "BuildResult", "make_target", "build", "save_tensors", "load_tensors",
           "CPUS"]

log = logging.getLogger(__name__)

# -mcpu names with their features; "+dotprod" gives the int8 sdot/udot instructions
CPUS: dict[str, list[str]] = {
    "generic": ["+neon"],
    "cortex-a53": ["+neon"],
    "cortex-a55": ["+neon", "+dotprod"],
    "cortex-a76": ["+neon", "+dotprod"],
    "cortex-x1": ["+neon", "+dotprod"],
}


@dataclass(frozen=True)
class BuildOptions:
    """Knobs of a mobile build.

    Attributes:
        cpu: an entry of `CPUS` (sets -mcpu and the NEON/dotprod features).
        schedule: "neon" (Ember's rule-based schedules) or "none" (TVM's untuned default).
        threads: the parallel loops' thread count hint (num-cores of the target).
        dotprod: force +dotprod on/off (default: the cpu's features).
    """

    cpu: str = "generic"
    schedule: str = "neon"
    threads: int = 4
    dotprod: bool | None = None

    def mattr(self) -> list[str]:
        if self.cpu not in CPUS:
            raise CompilerError(f"unknown mobile cpu '{self.cpu}'; known: {', '.join(CPUS)}")
        feats = [f for f in CPUS[self.cpu] if f != "+dotprod"]
        dot = "+dotprod" in CPUS[self.cpu] if self.dotprod is None else self.dotprod
        return feats + (["+dotprod"] if dot else [])


@dataclass
class BuildResult:
    library: Path
    weights: list[torch.Tensor]
    target: str
    seconds: dict[str, float] = field(default_factory=dict)
    scheduled: dict[str, str] = field(default_factory=dict)


def make_target(opts: BuildOptions) -> Any:
    import tvm

    spec: dict[str, Any] = {"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                            "mattr": opts.mattr(), "num-cores": int(opts.threads)}
    if opts.cpu != "generic":
        spec["mcpu"] = opts.cpu
    return tvm.target.Target(spec)


# ----------------------------------------------------------------------------- weights I/O
def _to_tvm(t: torch.Tensor) -> Any:
    import tvm

    a = t.detach().cpu().numpy()
    # np.ascontiguousarray returns at least 1-d: a 0-d weight (an ONNX scalar constant) would
    # reach the VM as shape (1,) and fail its ndim check
    return tvm.runtime.tensor(np.ascontiguousarray(a).reshape(a.shape))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """TVM's param-dict format (no pickle): what the runner reads with runtime.LoadParams."""
    import tvm

    tvm.runtime.save_param_dict_to_file({k: _to_tvm(v) for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    import tvm

    raw = tvm.runtime.load_param_dict_from_file(str(path))
    return {k: torch.from_numpy(np.array(v.numpy())) for k, v in raw.items()}


# ----------------------------------------------------------------------------- pipeline
def _lift_params(rm: RelaxModel) -> tuple[Any, list[torch.Tensor]]:
    """Splits weight-only work into ``main_transform_params``, runs it here, returns the module
    with only ``main`` and the transformed weights in ``main``'s parameter order."""
    import tvm
    from tvm import relax

    mod = relax.transform.LiftTransformParams()(rm.mod)
    tp_name = "main_transform_params"
    if tp_name not in [gv.name_hint for gv in mod.get_global_vars()]:
        return mod, list(rm.params)
    tp_mod = tvm.IRModule({tp_name: mod[tp_name]})
    # main and the helper functions it calls, under the same GlobalVars (call_tir holds them)
    main_mod = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != tp_name},
                            attrs=mod.attrs)
    host = tvm.target.Target("llvm")
    ex = tvm.compile(tp_mod, host)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm[tp_name]([_to_tvm(p) for p in rm.params])
    weights = [torch.from_numpy(np.array(t.numpy())) for t in out]
    return main_mod, weights


def _main_pipeline(target: Any, schedule: str, report: dict[str, str]) -> Any:
    import tvm
    from tvm import relax

    from . import schedules

    @tvm.transform.module_pass(opt_level=0, name="EmberMobilePipeline")
    def pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            seq = [
                relax.transform.DecomposeOpsForInference(),
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
                relax.transform.DeadCodeElimination(),
            ]
            mod = tvm.transform.Sequential(seq)(mod)
            if schedule == "neon":
                mod = schedules.apply(mod, target, report)
            elif schedule != "none":
                raise CompilerError(f"unknown mobile schedule '{schedule}' (neon|none)")
            seq = [
                relax.transform.RewriteDataflowReshape(),
                relax.transform.ToNonDataflow(),
                relax.transform.RemovePurityChecking(),
                relax.transform.CallTIRRewrite(),
                relax.transform.StaticPlanBlockMemory(),
                relax.transform.LowerAllocTensor(),
                relax.transform.KillAfterLastUse(),
                relax.transform.LowerRuntimeBuiltin(),
                relax.transform.ComputePrimValue(),
                relax.transform.VMShapeLower(),
                relax.transform.AttachGlobalSymbol(),
            ]
            return tvm.transform.Sequential(seq)(mod)

    return pipeline


def build(rm: RelaxModel, out_dir: Path, opts: BuildOptions, lib_name: str = "model.so",
          cxx: str = CROSS_CXX) -> BuildResult:
    """Compiles ``rm`` into ``out_dir/lib_name``; returns the library and the weights."""
    import tvm
    from tvm.support import cc

    secs: dict[str, float] = {}
    t0 = time.perf_counter()
    mod, weights = _lift_params(rm)
    secs["transform_params"] = time.perf_counter() - t0
    target = make_target(opts)
    report: dict[str, str] = {}
    t0 = time.perf_counter()
    try:
        ex = tvm.compile(mod, target, relax_pipeline=_main_pipeline(target, opts.schedule,
                                                                     report))
    except CompilerError:
        raise
    except Exception as e:  # TVM raises its own error types from deep inside
        msg = str(e).strip().splitlines()
        raise CompilerError(f"TVM failed to build for aarch64: {msg[-1] if msg else e}") from e
    secs["tvm_build"] = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / lib_name
    t0 = time.perf_counter()
    ex.export_library(str(lib), fcompile=cc.cross_compiler(cxx))
    secs["link"] = time.perf_counter() - t0
    log.info("mobile build: %s", ", ".join(f"{k} {v:.1f}s" for k, v in secs.items()))
    return BuildResult(lib, weights, str(target), secs, report)


def check_weights(weights: Sequence[torch.Tensor], mod: Any) -> None:
    """The weights match ``main``'s parameters after the inputs (count only; shapes are checked
    by the VM at call time)."""
    n_in = int(mod["main"].attrs["num_input"])
    n_params = len(mod["main"].params) - n_in
    if n_params != len(weights):
        raise CompilerError(f"internal: main takes {n_params} weights, have {len(weights)}")
