"""ONNX conformance for Ember: an ``onnx.backend`` Backend (import_onnx + reference interpreter)
and a runner over the ONNX node tests that writes ``tests/onnx_conformance.md``.

The node tests come from ``onnx/backend/test/data/node`` when the installed wheel ships them;
onnx 1.23 wheels do not, so they are generated in memory from ``onnx.backend.test.case.node``
(the same generators that write those files: model + inputs + expected outputs).

Run directly: ``python -m tests.frontends.onnx_backend`` (or through the pytest test).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnx.backend.base import Backend, BackendRep

from ember.errors import UnsupportedOpError
from ember.frontends.onnx import ONNX_DTYPES, import_onnx
from ember.ir import run_graph

log = logging.getLogger(__name__)

REPORT = Path(__file__).resolve().parents[1] / "onnx_conformance.md"

# ONNX ops that the exporters of BERT, ViT, GPT-2, LLaMA, ResNet, MobileNet, DINOv2 and
# YOLO-style detectors emit (torch.onnx / tf2onnx / paddle2onnx, opsets 13-21). Every node
# test of these ops must pass (float dtypes; see OUT_OF_SCOPE_DTYPES).
CLAIMED_OPS: tuple[str, ...] = (
    # elementwise math
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Abs", "Exp", "Log",
    "Erf", "Tanh", "Sigmoid", "Sin", "Cos", "Floor", "Ceil", "Max", "Min", "Where", "Equal",
    "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Cast",
    "Identity", "Dropout", "Clip",
    # activations
    "Relu", "LeakyRelu", "HardSigmoid", "HardSwish", "Softplus", "Mish", "Gelu", "PRelu", "Elu",
    # softmax / reductions
    "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin",
    "ReduceProd", "ReduceL2", "ArgMax", "CumSum", "TopK",
    # linear algebra, conv, pooling
    "MatMul", "Gemm", "Einsum", "Conv", "ConvTranspose", "MaxPool", "AveragePool",
    "GlobalAveragePool",
    # norms
    "BatchNormalization", "LayerNormalization", "InstanceNormalization",
    # shapes and indexing
    "Shape", "Size", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat",
    "Split", "Slice", "Gather", "GatherElements", "Expand", "Tile", "Range", "Constant",
    "ConstantOfShape", "Pad", "Trilu", "Resize", "Upsample", "DepthToSpace", "SpaceToDepth",
)

# Element types the IR has no dtype for: their test variants are out of scope.
OUT_OF_SCOPE_DTYPES = ("string", "uint16", "uint32", "uint64", "float8*", "int4", "uint4",
                       "float4", "complex64", "complex128")


# Operand slots an AOT compiler needs at compile time (shapes, axes, sizes, k, ...). Node tests
# feed them as graph inputs; the backend binds such inputs as constants when it sees their
# values (one compiled graph per distinct binding), as an AOT deployment would.
STATIC_OPERANDS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "Squeeze": (1,),
    "Unsqueeze": (1,), "Split": (1,), "TopK": (1,), "Trilu": (1,), "Resize": (1, 2, 3),
    "Upsample": (1,), "Pad": (1, 2, 3), "CumSum": (1,), "ConstantOfShape": (0,),
    "Range": (0, 1, 2), "OneHot": (1, 2), "Dropout": (1, 2), "ReduceSum": (1,), "ReduceMean": (1,),
    "ReduceMax": (1,), "ReduceMin": (1,), "ReduceProd": (1,), "ReduceL1": (1,),
    "ReduceL2": (1,), "ReduceLogSum": (1,), "ReduceLogSumExp": (1,), "ReduceSumSquare": (1,),
}


def static_input_names(model: onnx.ModelProto) -> list[str]:
    inputs = {i.name for i in model.graph.input}
    out: list[str] = []
    for n in model.graph.node:
        for k in STATIC_OPERANDS.get(n.op_type, ()):
            if k < len(n.input) and n.input[k] in inputs and n.input[k] not in out:
                out.append(n.input[k])
    return out


def bind_inputs(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs ``values`` are initializers."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = [i for i in m.graph.input if i.name not in values]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    for name, arr in values.items():
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(arr), name))
    return m


class EmberBackendRep(BackendRep):
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        inits = {t.name for t in model.graph.initializer}
        self.input_names = [i.name for i in model.graph.input if i.name not in inits]
        self.static = static_input_names(model)
        self._graphs: dict[bytes, Any] = {}
        if not self.static:
            self._graphs[b""] = import_onnx(model)

    def run(self, inputs: Any, **kwargs: Any) -> tuple[np.ndarray, ...]:
        if isinstance(inputs, dict):
            inputs = [inputs[n] for n in self.input_names]
        elif isinstance(inputs, np.ndarray):
            inputs = [inputs]
        named = dict(zip(self.input_names, inputs))
        bound = {n: np.asarray(named[n]) for n in self.static if n in named}
        key = b"".join(n.encode() + a.tobytes() + str(a.shape).encode()
                       for n, a in bound.items())
        g = self._graphs.get(key)
        if g is None:
            g = import_onnx(bind_inputs(self.model, bound))
            self._graphs[key] = g
        rest = [named[n] for n in self.input_names if n not in bound]
        ts = [_to_torch(a) for a in rest]
        outs = run_graph(g, *ts)
        return tuple(_to_numpy(o) for o in outs)


def _to_torch(a: Any) -> torch.Tensor:
    a = np.array(a, copy=True)  # keeps 0-d arrays 0-d
    if a.dtype.name == "bfloat16":  # ml_dtypes
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(a)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.float().numpy()
    return t.detach().cpu().numpy()


class EmberBackend(Backend):
    """``onnx.backend`` API over import_onnx + the reference interpreter (CPU)."""

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU",
                **kwargs: Any) -> EmberBackendRep:
        super().prepare(model, device, **kwargs)
        return EmberBackendRep(model)

    @classmethod
    def run_model(cls, model: onnx.ModelProto, inputs: Any, device: str = "CPU",
                  **kwargs: Any) -> tuple[np.ndarray, ...]:
        return cls.prepare(model, device).run(inputs)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device.upper().startswith("CPU")


# ----------------------------------------------------------------------------- node tests
@dataclass
class NodeCase:
    name: str
    model: onnx.ModelProto
    data_sets: list[tuple[list[np.ndarray], list[np.ndarray]]]
    rtol: float = 1e-3
    atol: float = 1e-7


def node_cases() -> Iterator[NodeCase]:
    """Every ONNX node test: from the wheel's data dir when present, else generated."""
    data = Path(onnx.__file__).parent / "backend" / "test" / "data" / "node"
    dirs = sorted(p for p in data.iterdir() if p.is_dir()) if data.is_dir() else []
    if dirs:
        for d in dirs:
            model = onnx.load(str(d / "model.onnx"))
            sets = []
            for ds in sorted(d.glob("test_data_set_*")):
                ins = [_read_pb(p) for p in sorted(ds.glob("input_*.pb"))]
                outs = [_read_pb(p) for p in sorted(ds.glob("output_*.pb"))]
                sets.append((ins, outs))
            yield NodeCase(d.name, model, sets)
        return
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            cases = collect_testcases(None)
    for c in cases:
        sets = [([_as_np(a) for a in ins], [_as_np(a) for a in outs])
                for ins, outs in (c.data_sets or [])]
        yield NodeCase(c.name, c.model, sets, getattr(c, "rtol", 1e-3), getattr(c, "atol", 1e-7))


def _as_np(a: Any) -> Any:
    return numpy_helper.to_array(a) if isinstance(a, onnx.TensorProto) else a


def _read_pb(p: Path) -> np.ndarray:
    t = onnx.TensorProto()
    t.ParseFromString(p.read_bytes())
    return numpy_helper.to_array(t)


@dataclass
class CaseResult:
    name: str
    op: str
    status: str  # passed | failed | unsupported
    detail: str = ""


@dataclass
class Conformance:
    results: list[CaseResult] = field(default_factory=list)
    seconds: float = 0.0

    def by_op(self) -> dict[str, Counter]:
        out: dict[str, Counter] = defaultdict(Counter)
        for r in self.results:
            out[r.op][r.status] += 1
        return dict(sorted(out.items()))

    def rate(self, ops: Sequence[str] | None = None, in_scope: bool = False) -> tuple[int, int]:
        rs = [r for r in self.results if (ops is None or r.op in ops)
              and (not in_scope or not out_of_scope(r))]
        return sum(r.status == "passed" for r in rs), len(rs)


def out_of_scope(r: CaseResult) -> bool:
    """Variants the claim excludes: IR-less dtypes, random training Dropout, Loop bodies."""
    return r.status == "unsupported" and any(
        s in r.detail for s in ("out of scope", "random Dropout", "- Loop at", "- Scan at"))


def _case_op(model: onnx.ModelProto, name: str, base_ops: dict[str, str]) -> str:
    stem = name.split("_expanded")[0]
    if stem in base_ops:
        return base_ops[stem]
    nodes = model.graph.node
    return nodes[0].op_type if len(nodes) == 1 else (nodes[-1].op_type if nodes else "?")


def _bad_dtype(model: onnx.ModelProto) -> str | None:
    def check(vi: onnx.ValueInfoProto) -> str | None:
        if not vi.type.HasField("tensor_type"):
            return "non-tensor"
        et = vi.type.tensor_type.elem_type
        if et and et not in ONNX_DTYPES:
            return onnx.helper.tensor_dtype_to_string(et).replace("TensorProto.", "").lower()
        return None
    for vi in (*model.graph.input, *model.graph.output):
        bad = check(vi)
        if bad:
            return bad
    return None


def run_case(case: NodeCase) -> tuple[str, str]:
    bad = _bad_dtype(case.model)
    if bad:
        return "unsupported", f"dtype {bad} (out of scope)"
    try:
        rep = EmberBackend.prepare(case.model)
    except UnsupportedOpError as e:
        return "unsupported", str(e).splitlines()[-1].strip()
    except Exception as e:
        return "failed", f"import: {type(e).__name__}: {' '.join(str(e).split())[:160]}"
    for ins, want in case.data_sets:
        try:
            got = rep.run(list(ins))
        except UnsupportedOpError as e:
            return "unsupported", str(e).splitlines()[-1].strip()
        except Exception as e:
            return "failed", f"run: {type(e).__name__}: {' '.join(str(e).split())[:160]}"
        if len(got) != len(want):
            return "failed", f"{len(got)} outputs, expected {len(want)}"
        for g, w in zip(got, want):
            w = np.asarray(w)
            if g.shape != w.shape:
                return "failed", f"shape {g.shape} != {w.shape}"
            if w.dtype.kind in "fc" or g.dtype.kind == "f":
                ok = np.allclose(g.astype(np.float64), w.astype(np.float64), rtol=case.rtol,
                                 atol=max(case.atol, 1e-7), equal_nan=True)
            else:
                ok = np.array_equal(g, w)
            if not ok:
                err = np.nanmax(np.abs(g.astype(np.float64) - w.astype(np.float64))) \
                    if g.size else 0.0
                return "failed", f"values differ (max abs err {err:.3g})"
            if g.dtype != w.dtype and not (w.dtype == np.dtype("V2") or w.dtype.kind == "V"):
                return "failed", f"dtype {g.dtype} != {w.dtype}"
    return "passed", ""


def run_conformance(write: Path | None = REPORT) -> Conformance:
    t0 = time.time()
    torch.set_num_threads(1)
    conf = Conformance()
    cases = list(node_cases())
    base_ops = {c.name: c.model.graph.node[0].op_type for c in cases
                if len(c.model.graph.node) == 1 and "_expanded" not in c.name}
    logging.getLogger("ember").setLevel(logging.ERROR)
    for case in cases:
        op = _case_op(case.model, case.name, base_ops)
        status, detail = run_case(case)
        conf.results.append(CaseResult(case.name, op, status, detail))
    conf.seconds = time.time() - t0
    if write is not None:
        write.write_text(render_report(conf))
    return conf


def render_report(conf: Conformance) -> str:
    p_all, n_all = conf.rate()
    p_cl, n_cl = conf.rate(CLAIMED_OPS)
    p_in, n_in = conf.rate(CLAIMED_OPS, in_scope=True)
    lines = [
        "# ONNX conformance (Ember ONNX frontend + reference interpreter)",
        "",
        "Generated by `python -m tests.frontends.onnx_backend` (also run by "
        "`tests/frontends/test_onnx_conformance.py`). Do not edit by hand.",
        "",
        f"- onnx {onnx.__version__}, torch {torch.__version__}; {n_all} node tests",
        f"- **Claimed op set, in-scope variants: {p_in}/{n_in} node tests pass "
        f"({100 * p_in / max(n_in, 1):.1f}%)**; all variants of the claimed ops: "
        f"{p_cl}/{n_cl} ({100 * p_cl / max(n_cl, 1):.1f}%)",
        f"- **Full ONNX node-test suite: {p_all}/{n_all} pass "
        f"({100 * p_all / max(n_all, 1):.1f}%)**; "
        f"{sum(r.status == 'unsupported' for r in conf.results)} unsupported, "
        f"{sum(r.status == 'failed' for r in conf.results)} failed",
        "",
        "Claimed op set (what exporters of BERT, ViT, GPT-2, LLaMA, ResNet, MobileNet, DINOv2 "
        "and YOLO-style detectors emit):",
        "",
        ", ".join(f"`{o}`" for o in CLAIMED_OPS),
        "",
        "Out of scope: test variants whose inputs or outputs use element types the IR has no "
        f"dtype for ({', '.join(OUT_OF_SCOPE_DTYPES)}), training-mode Dropout with a "
        "nonzero ratio (random), and `*_expanded` variants whose function body uses "
        "`Loop`/`Scan` (control flow is not imported). They count as unsupported. "
        "A test counts for the op of its (single) node; `*_expanded` function-body tests "
        "count for the op they expand.",
        "",
        "| op | claimed | passed | failed | unsupported | notes |",
        "|---|---|---|---|---|---|",
    ]
    notes: dict[str, list[str]] = defaultdict(list)
    for r in conf.results:
        if r.status != "passed" and len(notes[r.op]) < 2:
            notes[r.op].append(f"{r.name}: {r.detail}".replace("|", "/"))
    for op, c in conf.by_op().items():
        mark = "yes" if op in CLAIMED_OPS else ""
        lines.append(f"| {op} | {mark} | {c['passed']} | {c['failed']} | {c['unsupported']} | "
                     f"{'; '.join(notes[op])[:220]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    conf = run_conformance()
    p, n = conf.rate(CLAIMED_OPS)
    pa, na = conf.rate()
    log.info("claimed ops %d/%d, all %d/%d, %.0f s -> %s", p, n, pa, na, conf.seconds, REPORT)
    if os.environ.get("EMBER_CONFORMANCE_VERBOSE"):
        for r in conf.results:
            if (r.status == "failed" or (r.op in CLAIMED_OPS and r.status != "passed")) \
                    and "out of scope" not in r.detail:
                log.info("%s %s [%s] %s", r.status, r.name, r.op, r.detail)


if __name__ == "__main__":
    main()
