"""Robustness sweep: Ember on tiny random-init architectures it was not written against.

For every model of ``tests/unseen_models.py`` (``UNSEEN``), stage by stage:

* ``fx``: FX import + reference interpreter vs eager (max abs err <= 1e-4 x max(1, |ref|)),
  on the example inputs and on new batch/seq sizes;
* ``O2``: ``ember.compile(..., passes="O2")`` vs eager, same tolerance (CPU backend in
  ``--mode``: onnxruntime by default, which runs Ember's own ONNX export; ``auto`` also builds
  and times AOTInductor, much slower);
* ``w8a8``: ``O2,quantize{scheme=w8a8-dynamic,gate=always}``, cosine >= 0.98 vs eager;
* ``merge`` / ``prune`` (non-causal models): ``merge_tokens{r=2}`` and
  ``prune_tokens{method=attention,keep=0.5}``: output shape kept and finite, or recorded as
  not applied with a reason;
* ``skip`` (causal LMs): ``skip_layers{method=static,num_layers=1}`` calibrated on the example;
* ``onnx``: ``torch.onnx.export(dynamo=False, opset 17)`` then ``ember.compile(file)`` vs
  ONNX Runtime on the same file.

Prints a table: ok / n/a (reason) / FAIL (short error). Run from the repo root:

    .venv/bin/python examples/unseen_sweep.py [--models a,b] [--stages fx,O2] [--mode auto]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import unseen_models  # noqa: E402

import ember  # noqa: E402
from ember.frontends import fx  # noqa: E402
from ember.ir import run_graph  # noqa: E402

STAGES = ["fx", "O2", "w8a8", "merge", "prune", "skip", "onnx"]
TOL = 1e-4
MIN_COS = 0.98


class NotApplied(Exception):
    """The stage does not apply to this model (with the pass's own reason)."""


def eager(model: torch.nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(*inputs)
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def rel_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    if len(got) != len(want):
        raise AssertionError(f"{len(got)} outputs, eager has {len(want)}")
    worst = 0.0
    for i, (g, w) in enumerate(zip(got, want)):
        g = torch.as_tensor(g)
        if tuple(g.shape) != tuple(w.shape):
            raise AssertionError(f"output {i} shape {tuple(g.shape)} != {tuple(w.shape)}")
        if not w.is_floating_point():
            if not torch.equal(g.to(w.dtype), w):
                raise AssertionError(f"integer output {i} differs")
            continue
        if w.numel():
            scale = max(1.0, float(w.abs().max()))
            worst = max(worst, float((g.float() - w.float()).abs().max()) / scale)
    return worst


def check_close(got: list[torch.Tensor], want: list[torch.Tensor], tol: float = TOL) -> str:
    err = rel_err(got, want)
    if not err <= tol:
        raise AssertionError(f"rel err {err:.2e} > {tol:g}")
    return f"{err:.0e}"


def cosine(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    if not any(float(t.float().abs().max()) > 0 for t in want if t.numel()):
        raise AssertionError("eager output is all zeros: the test model is degenerate")
    a = torch.cat([torch.as_tensor(t).float().flatten() for t in got])
    b = torch.cat([t.float().flatten() for t in want])
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def outputs(cm: Any, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        return [torch.as_tensor(t) for t in cm.run(*inputs)]


def compile_z(z: Any, passes: str, mode: str, **kw: Any) -> Any:
    return ember.compile(z.model, z.example_inputs, target="cpu", passes=passes,
                         dynamic_dims=z.dynamic_dims, input_names=z.input_names, strict=True,
                         backend_options={"mode": mode}, **kw)


def _not_applied(cm: Any, name: str) -> None:
    rec = cm.records.get(name, {})
    if rec.get("applied") is False:
        raise NotApplied(str(rec.get("reason", "no reason recorded")))


def stage_fx(z: Any, mode: str) -> str:
    g = fx.import_module(z.model, z.example_inputs, z.dynamic_dims, z.input_names)
    msg = check_close(run_graph(g, *z.example_inputs), eager(z.model, z.example_inputs))
    ins = z.make_inputs(batch=3, seq=5)
    check_close(run_graph(g, *ins), eager(z.model, ins))
    return msg


def stage_o2(z: Any, mode: str) -> str:
    cm = compile_z(z, "O2", mode)
    msg = check_close(outputs(cm, z.example_inputs), eager(z.model, z.example_inputs))
    ins = z.make_inputs(batch=3, seq=5)
    check_close(outputs(cm, ins), eager(z.model, ins))
    return f"{msg} {cm.backend}/{cm.placement.get('program', {}).get('kind', '?')}"


def stage_w8a8(z: Any, mode: str) -> str:
    cm = compile_z(z, "O2,quantize{scheme=w8a8-dynamic,gate=always}", mode)
    _not_applied(cm, "quantize")
    c = cosine(outputs(cm, z.example_inputs), eager(z.model, z.example_inputs))
    if not c >= MIN_COS:
        raise AssertionError(f"cosine {c:.4f} < {MIN_COS}")
    return f"cos {c:.4f}"


def _approx(z: Any, mode: str, passes: str, name: str, **kw: Any) -> str:
    cm = compile_z(z, passes, mode, **kw)
    _not_applied(cm, name)
    if name not in cm.records:
        raise AssertionError(f"{name} left no record")
    got, want = outputs(cm, z.example_inputs), eager(z.model, z.example_inputs)
    if len(got) != len(want):
        raise AssertionError(f"{len(got)} outputs, eager has {len(want)}")
    for g, w in zip(got, want):
        if tuple(g.shape) != tuple(w.shape):
            raise AssertionError(f"shape {tuple(g.shape)} != eager {tuple(w.shape)}")
        if g.is_floating_point() and not bool(torch.isfinite(g).all()):
            raise AssertionError("non-finite output")
    return f"cos {cosine(got, want):.3f}"


def stage_merge(z: Any, mode: str) -> str:
    if z.name in unseen_models.CAUSAL:
        raise NotApplied("causal LM")
    return _approx(z, mode, "O2,merge_tokens{r=2}", "merge_tokens")


def stage_prune(z: Any, mode: str) -> str:
    if z.name in unseen_models.CAUSAL:
        raise NotApplied("causal LM")
    return _approx(z, mode, "O2,prune_tokens{method=attention,keep=0.5}", "prune_tokens")


def stage_skip(z: Any, mode: str) -> str:
    if z.name not in unseen_models.CAUSAL:
        raise NotApplied("not a causal LM")
    return _approx(z, mode, "O2,skip_layers{method=static,num_layers=1}", "skip_layers",
                   calib=[z.example_inputs])


class _Positional(torch.nn.Module):
    """Calls the model with positional tensors only (the legacy exporter otherwise binds some
    HF forwards' keyword arguments twice)."""

    def __init__(self, m: torch.nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, *args: torch.Tensor) -> Any:
        return self.m(*args)


def stage_onnx(z: Any, mode: str) -> str:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{z.name}.onnx"
        axes = {n: dict(v) for n, v in z.dynamic_dims.items()}
        try:
            with torch.no_grad(), warnings.catch_warnings(), \
                    contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(_Positional(z.model), z.example_inputs, str(path),
                                  dynamo=False, opset_version=17,
                                  input_names=list(z.input_names), dynamic_axes=axes)
        except Exception as e:  # noqa: BLE001  (torch's exporter, not Ember)
            raise NotApplied(f"torch.onnx cannot export: {short(e)}") from e
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        cm = ember.compile(str(path), target="cpu", passes="O2", strict=True,
                           backend_options={"mode": mode})
        msgs = []
        for ins in (z.example_inputs, z.make_inputs(batch=3, seq=5)):
            feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), ins)}
            want = [torch.from_numpy(a) for a in sess.run(None, feeds)]
            msgs.append(check_close(outputs(cm, ins), want))
        return msgs[0]


FUNCS = {"fx": stage_fx, "O2": stage_o2, "w8a8": stage_w8a8, "merge": stage_merge,
         "prune": stage_prune, "skip": stage_skip, "onnx": stage_onnx}


def short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:110]


def run(name: str, stages: list[str], mode: str, verbose: bool) -> dict[str, str]:
    row: dict[str, str] = {}
    for st in stages:
        t = time.perf_counter()
        try:
            z = unseen_models.UNSEEN[name]()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row[st] = "ok " + FUNCS[st](z, mode)
        except NotApplied as e:
            row[st] = f"n/a ({str(e)[:90]})"
        except Exception as e:  # noqa: BLE001  (the sweep reports every failure)
            row[st] = f"FAIL ({short(e)})"
            if verbose:
                traceback.print_exc()
        print(f"  {name:16s} {st:6s} {time.perf_counter() - t:5.1f}s  {row[st]}", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="", help="comma-separated (default: all of UNSEEN)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--mode", default="onnxruntime", help="cpu backend mode (onnxruntime, "
                    "eager, aoti, auto)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-v", "--verbose", action="store_true", help="print tracebacks")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import logging

    logging.disable(logging.WARNING)
    names = [m for m in a.models.split(",") if m] or list(unseen_models.UNSEEN)
    stages = [s for s in a.stages.split(",") if s]
    table = {n: run(n, stages, a.mode, a.verbose) for n in names}
    print()
    print("| model | " + " | ".join(stages) + " |")
    print("|---" * (len(stages) + 1) + "|")
    for n, row in table.items():
        print(f"| {n} | " + " | ".join(row[s] for s in stages) + " |")
    fails = sum(v.startswith("FAIL") for row in table.values() for v in row.values())
    print(f"\n{fails} failures in {len(names)} models x {len(stages)} stages")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
