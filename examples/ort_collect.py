"""Collect per-node ONNX Runtime profiles of synthetic graphs and fit the ORT latency model.

Commands::

    python examples/ort_collect.py prepare -d WORK [--n 48] [--seed 0]
    python examples/ort_collect.py collect -d WORK -o ort_nodes.json
    python examples/ort_collect.py fit ort_nodes.json [-o cost_models/data/cpu_ort_model.json]

``prepare`` builds `ort_synth` training models, runs Ember's default pipeline on each and
exports the optimized IR to ONNX exactly as the CPU backend does (slow; any machine).
``collect`` (on a quiet machine) then at each symbol point times
(a) the end-to-end call through `CompiledModel.run` on the backend's own ORT runner and
(b) the same model in a profiling session, whose per-kernel durations are mapped back to the
IR node that emitted them (ORT-fused kernels go to the IR node of their output). ``fit``
(`ember.cost_models.ort_fit`) regresses ``e2e - sum(kernels)`` on the kernel count and graph I/O count (the per-call and
per-kernel overheads), then fits gradient-boosted trees on every node's
``log(measured / roofline)``, and reports graph-level accuracy on held-out graphs.

A script, not part of the cost model: collecting needs the driver, the CPU backend's exporter
and its ORT runner, which the cost model may not import; the model reads only the fitted JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ember.cost_models.devices import get_device
from ember.cost_models.ort import (
    DEFAULT_ORT_MODEL,
    ORT_FEATURES,
    node_features,
    node_roofline_s,
)
from ember.cost_models.ort_fit import fit
from ember.timing import call_samples_s

__all__ = ["prepare", "collect", "prepare_graph", "time_graph"]

log = logging.getLogger(__name__)


def _name_nodes(model: Any, g: Any) -> dict[str, int]:
    """Names every ONNX node ``e<j>`` and returns tensor and node name -> IR node index.

    The exporter emits each IR node's ONNX nodes in order, the last of them writing the IR
    value's name (or an ``Identity`` onto it); everything since the previous such node
    belongs to that IR node.
    """
    ir_of_value = {v.name: i for i, n in enumerate(g.nodes) for v in n.outputs}
    tensor_ir: dict[str, int] = {}
    pending: list[Any] = []
    for j, node in enumerate(model.graph.node):
        node.name = f"e{j}"
        pending.append(node)
        hit = [ir_of_value[o] for o in node.output if o in ir_of_value]
        if hit:
            i = max(hit)
            for p in pending:
                tensor_ir[p.name] = i
                for o in p.output:
                    tensor_ir.setdefault(o, i)
            pending = []
    for p in pending:   # the graph-output Identities: their IR node is their input's
        i = tensor_ir.get(p.input[0], -1) if p.input else -1
        tensor_ir[p.name] = i
        for o in p.output:
            tensor_ir[o] = i
    return tensor_ir


def _ort_node_ir(opt_model: Any, tensor_ir: Mapping[str, int]) -> dict[str, int]:
    """Optimized ORT node name -> IR node index.

    By output tensor; else by the name ORT derived from an original node (``e12/...Fusion``)
    or tensor (``relu__2_nchwc``); else by the latest IR node among the inputs; else (a node
    ORT added on a graph input) by its first consumer's.
    """
    known = {k: v for k, v in tensor_ir.items() if v >= 0}
    out: dict[str, int] = {}
    for node in opt_model.graph.node:
        idx = [known[o] for o in node.output if o in known]
        stem = node.name.split("/")[0]
        if not idx and stem in known:
            idx = [known[stem]]
        if not idx and node.name.endswith("_nchwc") and node.name[:-6] in known:
            idx = [known[node.name[:-6]]]
        if not idx:
            idx = [known[t] for t in node.input if t in known]
        i = max(idx) if idx else -1
        out[node.name] = i
        if i >= 0:
            for o in node.output:
                known.setdefault(o, i)
    # nodes ORT added on graph inputs (an Unsqueeze of a mask): their first consumer's node
    for node in reversed(opt_model.graph.node):
        if out[node.name] < 0:
            users = [out[u.name] for u in opt_model.graph.node
                     if any(o in u.input for o in node.output) and out[u.name] >= 0]
            out[node.name] = min(users) if users else -1
    return out


def _median_iqr(xs: Sequence[float]) -> tuple[float, float]:
    s = sorted(xs)
    med = statistics.median(s)
    return med, (s[3 * len(s) // 4] - s[len(s) // 4]) / med if med > 0 else 0.0


def _trimmed_mean(xs: Sequence[float]) -> float:
    """Mean of the fastest half: ORT reports whole microseconds, so a median would round
    sub-microsecond kernels to 0 or 1 us; the slower half holds the preemptions (on a shared
    machine another process often takes one of the two cores mid-kernel)."""
    s = sorted(xs)
    s = s[: max(1, len(s) // 2)]
    return sum(s) / len(s)


def _session(path: Path, profile_prefix: str | None = None,
             optimized: Path | None = None) -> Any:
    """An ORT session with the CPU backend's options (`_OrtRunner`), optionally profiling."""
    import torch

    from ember.backends.cpu.onnx.session import open_session, session_options
    from ember.backends.cpu.ort_tuning import disabled_optimizers

    so = session_options(torch.get_num_threads())
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return open_session(path, so, disabled_optimizers(so.intra_op_num_threads))


def prepare_graph(sm: Any, work: Path, dev: Any) -> bool:
    """Imports, optimizes and exports one training model into ``work`` (no timing): the
    named ONNX model, and a JSON sidecar with the IR inputs, the tensor -> IR node map and
    every node's roofline and features at each symbol point."""
    import onnx
    import torch

    from ember.backends.cpu.onnx import export_onnx
    from ember.backends.cpu.ort_tuning import export_choices
    from ember.frontends import import_model
    from ember.passmanager import PassContext, PassManager, parse_pipeline
    from ember.pipelines import DEFAULT_PIPELINE

    g0 = import_model(sm.model, sm.example_inputs, sm.dynamic_dims, sm.input_names)
    ctx = PassContext(target="cpu")
    ctx.example_inputs = list(sm.example_inputs)
    g = PassManager(parse_pipeline(DEFAULT_PIPELINE)).run(g0, ctx)
    raw = work / f"{sm.name}.raw.onnx"
    # exactly as the CPU backend's candidate
    rep = export_onnx(g, raw, contrib_ops=True, **export_choices(torch.get_num_threads()))
    if rep.custom:
        log.info("%s: skipped (custom ops %s)", sm.name, rep.custom)
        return False
    model = onnx.load(str(raw))
    tensor_ir = _name_nodes(model, g)
    onnx.save(model, str(work / f"{sm.name}.onnx"))
    raw.unlink()
    points = []
    for pt in sm.points:
        ins = sm.make_inputs(**pt)
        roofs = [node_roofline_s(n, dev, pt) for n in g.nodes]
        feats = node_features(g, pt, dev, [r[1] for r in roofs], [r[2] for r in roofs])
        points.append({"pt": pt, "shapes": [list(t.shape) for t in ins],
                       "roof": [r[0] for r in roofs],
                       "f": [[round(f[k], 5) for k in ORT_FEATURES] for f in feats]})
    side = {"name": sm.name, "vocab": sm.vocab, "ops": [n.op for n in g.nodes],
            "inputs": [{"name": nm, "dtype": v.type.dtype, "rank": v.type.rank}
                       for nm, v in zip(g.input_names or [v.name for v in g.inputs], g.inputs)],
            "n_out": len(g.outputs), "tensor_ir": tensor_ir, "points": points}
    (work / f"{sm.name}.json").write_text(json.dumps(side))
    return True


def _stub_model(side: Mapping[str, Any], path: Path) -> Any:
    """A `CompiledModel` around the backend's ORT runner: the exact call path users time."""
    import torch

    from ember.backends.cpu.program import CpuProgram, _OrtRunner
    from ember.compiled import CompiledModel
    from ember.ir import GraphBuilder, TensorType, sym

    b = GraphBuilder(side["name"])
    # every dim its own symbol: the stub takes whatever sizes the ORT model takes
    vals = [b.add_input(i["name"], TensorType(i["dtype"], tuple(
        sym(f"{i['name']}_{j}") for j in range(i["rank"])))) for i in side["inputs"]]
    b.set_outputs(vals[:1])
    g = b.build()
    from ember.backends.cpu.ort_tuning import disabled_optimizers

    threads = torch.get_num_threads()
    prog = CpuProgram("onnxruntime", _OrtRunner(path, threads,
                                                disabled=disabled_optimizers(threads)), g, {})
    return CompiledModel(g, prog, target="cpu", backend="cpu", pipeline="O2", records={})


def _inputs(side: Mapping[str, Any], shapes: Sequence[Sequence[int]]) -> list[Any]:
    import torch

    gen = torch.Generator().manual_seed(7)
    out = []
    for i, shape in zip(side["inputs"], shapes):
        if i["dtype"].startswith("float"):
            out.append(torch.randn(*shape, generator=gen))
        elif i["name"] == "mask":
            out.append(torch.ones(*shape, dtype=torch.int64))
        else:
            out.append(torch.randint(0, max(side["vocab"], 2), tuple(shape), generator=gen))
    return out


def time_graph(side: Mapping[str, Any], work: Path, repeats: int) -> list[dict[str, Any]]:
    """Times one prepared model at each point: end-to-end calls through `CompiledModel.run`
    interleaved with runs of a profiling session; per-kernel medians mapped to IR nodes."""
    import onnx

    name = side["name"]
    path = work / f"{name}.onnx"
    opt = work / f"{name}.opt.onnx"
    prof = _session(path, str(work / f"{name}.prof"), opt)
    tensor_ir = dict(side["tensor_ir"])
    for node in onnx.load(str(path)).graph.node:   # ORT names fused nodes after originals
        ir = [tensor_ir[o] for o in node.output if o in tensor_ir]
        if ir:
            tensor_ir[node.name] = ir[0]
    node_ir = _ort_node_ir(onnx.load(str(opt)), tensor_ir)
    cm = _stub_model(side, path)
    names = [i.name for i in prof.get_inputs()]
    recs, spans, n_runs = [], [], 0
    for p in side["points"]:
        ins = _inputs(side, p["shapes"])
        feeds = {n: t.numpy() for n, t in zip(names, ins)}
        # the plain calls first, then the profiled runs: interleaved, the profiling session's
        # still-spinning workers took the cores from the call timed right after it
        time.sleep(0.05)
        e2e = call_samples_s(lambda ins=ins: cm.run(*ins), repeats, warmup=3)
        time.sleep(0.05)
        for _ in range(3 + repeats):
            prof.run(None, feeds)
        spans.append((n_runs + 3, n_runs + 3 + repeats))
        n_runs += 3 + repeats
        recs.append(e2e)
    prof_path = Path(prof.end_profiling())
    events = json.loads(prof_path.read_text())
    prof_path.unlink()
    per_node: dict[str, list[float]] = {}
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            per_node.setdefault(ev["name"][: -len("_kernel_time")], []).append(ev["dur"] * 1e-6)
    out = []
    n_ir = len(side["ops"])
    for p, e2e, (a, b) in zip(side["points"], recs, spans):
        node_t, node_k, node_min = [0.0] * n_ir, [0] * n_ir, [0.0] * n_ir
        other_t, other_k = 0.0, 0
        for kname, durs in per_node.items():
            if len(durs) < b:
                continue   # a kernel that did not run every time (should not happen)
            t = _trimmed_mean(durs[a:b])
            i = node_ir.get(kname, -1)
            if i >= 0:
                node_t[i] += t
                node_min[i] += min(durs[a:b])
                node_k[i] += 1
            else:
                other_t += t
                other_k += 1
        med, iqr = _median_iqr(e2e)
        out.append({"graph": name, "point": p["pt"], "e2e_s": med, "e2e_iqr": iqr,
                    "e2e_all": sorted(e2e),
                    "n_io": len(side["inputs"]) + side["n_out"], "other_s": other_t,
                    "other_k": other_k,
                    "nodes": [{"op": op, "t": node_t[i], "t_min": node_min[i], "k": node_k[i],
                               "roof": p["roof"][i], "f": p["f"][i]}
                              for i, op in enumerate(side["ops"])]})
    return out


def prepare(work: str | os.PathLike, *, n: int = 48, seed: int = 0, threads: int = 2) -> int:
    """Prepares ``n`` synthetic training models in ``work``; returns how many succeeded."""
    import torch

    from ember.cost_models.ort_synth import synth_models

    torch.set_num_threads(threads)
    dev = get_device("cpu", threads=threads)
    w = Path(work)
    w.mkdir(parents=True, exist_ok=True)
    (w / "device.json").write_text(json.dumps(dev.to_json()))
    ok = 0
    for sm in synth_models(n, seed):
        try:
            ok += prepare_graph(sm, w, dev)
        except Exception as e:  # noqa: BLE001  (a model the pipeline rejects is skipped)
            log.warning("%s: skipped (%s: %s)", sm.name, type(e).__name__,
                        str(e).splitlines()[0][:160] if str(e) else "")
    log.info("prepared %d/%d models in %s", ok, n, w)
    return ok


def collect(work: str | os.PathLike, out: str | os.PathLike, *, threads: int = 2,
            repeats: int = 15) -> dict[str, Any]:
    """Times every model prepared in ``work``; writes and returns the dataset."""
    import torch

    torch.set_num_threads(threads)
    w = Path(work)
    rows: list[dict[str, Any]] = []
    loads = []
    t0 = time.perf_counter()
    for side_path in sorted(w.glob("*.json")):
        if side_path.name == "device.json" or ".prof" in side_path.name:
            continue
        side = json.loads(side_path.read_text())
        try:
            rows += time_graph(side, w, repeats)
        except Exception as e:  # noqa: BLE001
            log.warning("%s: not timed (%s: %s)", side["name"], type(e).__name__, str(e)[:160])
        loads.append(os.getloadavg()[0])
    doc = {"format": "ember-ort-nodes", "version": 1, "features": list(ORT_FEATURES),
           "device": json.loads((w / "device.json").read_text()), "threads": threads,
           "repeats": repeats, "loadavg_1m": loads, "seconds": time.perf_counter() - t0,
           "rows": rows}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(doc))
    log.info("wrote %d (graph, point) rows to %s in %.0f s (load %.1f..%.1f)", len(rows), out,
             doc["seconds"], min(loads or [0]), max(loads or [0]))
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python examples/ort_collect.py",
                                 description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="build and export synthetic training graphs (no timing)")
    p.add_argument("-d", "--dir", required=True)
    p.add_argument("--n", type=int, default=48, help="number of synthetic models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    c = sub.add_parser("collect", help="time prepared graphs in ONNX Runtime (quiet machine)")
    c.add_argument("-d", "--dir", required=True)
    c.add_argument("-o", "--out", default="ort_nodes.json")
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--repeats", type=int, default=15)
    f = sub.add_parser("fit", help="fit the ORT latency model on a dataset")
    f.add_argument("dataset", nargs="+")
    f.add_argument("-o", "--out", default=str(DEFAULT_ORT_MODEL))
    f.add_argument("--stat", default="p10", choices=("p25", "median", "p10", "min"),
                   help="end-to-end statistic the call overhead is fit to")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "prepare":
        prepare(args.dir, n=args.n, seed=args.seed, threads=args.threads)
    elif args.cmd == "collect":
        collect(args.dir, args.out, threads=args.threads, repeats=args.repeats)
    else:
        docs = [json.loads(Path(p).read_text()) for p in args.dataset]
        merged = dict(docs[0], rows=[r for d in docs for r in d["rows"]])
        model = fit(merged, args.out, stat=args.stat)
        json.dump(dict(model.meta, call_overhead_s=model.call_overhead_s,
                       per_io_s=model.per_io_s), sys.stdout, indent=1)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
