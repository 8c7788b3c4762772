"""Where does a shipped ONNX Runtime program spend its time, and what did the cost model say?

Loads an `.ember` artifact whose CPU program is ONNX Runtime, runs its own ONNX file in a
profiling session (the backend's session options and disabled optimizers, the artifact's
weights), maps every ORT kernel back to the IR node it came from, and prints, per IR op:
nodes, ORT kernels, profiled time (mean of the fastest half of the calls) and the cost
model's prediction. The gap between the call and its kernels' sum is reported as well.

    python examples/ort_profile.py /tmp/cm_art/llama.ember --model llama --dims batch=1,seq=32

``--model`` names the zoo model that makes the inputs (tests/zoo.py, ``--size base``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "examples"))

import zoo  # noqa: E402
from ort_collect import _name_nodes, _ort_node_ir  # noqa: E402
from ort_collect import _trimmed_mean as _fast_half  # noqa: E402

import ember  # noqa: E402
from ember import cost_models as cm  # noqa: E402
from ember.cost_models.ort import estimate_graph_ort  # noqa: E402


def profile(art: Path, inputs: list[torch.Tensor], repeats: int, idle: float = 0.0) -> dict:
    """``idle``: seconds of sleep before each timed call (a sporadic caller's cold calls)."""
    import onnx
    import onnxruntime as ort

    from ember.backends.cpu.onnx.session import open_session, session_options
    from ember.backends.cpu.ort_tuning import disabled_optimizers
    from ember.backends.cpu.program import _external_params
    from ember.cost_models.analytical import op_class

    c = ember.load(art)
    g = c.graph
    work = Path(tempfile.mkdtemp(prefix="ort-prof-"))
    with zipfile.ZipFile(art) as z:
        z.extract("payload/model.onnx", work)
    model = onnx.load(str(work / "payload/model.onnx"), load_external_data=False)
    tensor_ir = _name_nodes(model, g)
    path = work / "named.onnx"
    onnx.save(model, str(path))
    threads = torch.get_num_threads()
    params = _external_params(path, g.weights)

    def session(profiled: bool) -> Any:
        so = session_options(threads)
        if profiled:
            so.enable_profiling = True
            so.profile_file_prefix = str(work / "prof")
            so.optimized_model_filepath = str(work / "opt.onnx")
        if params:
            so.add_external_initializers(list(params), [ort.OrtValue.ortvalue_from_numpy(a)
                                                        for a in params.values()])
        return open_session(path, so, disabled_optimizers(threads))

    sess = session(profiled=True)
    for node in model.graph.node:
        ir = [tensor_ir[o] for o in node.output if o in tensor_ir]
        if ir:
            tensor_ir[node.name] = ir[0]
    node_ir = _ort_node_ir(onnx.load(str(work / "opt.onnx"), load_external_data=False),
                           tensor_ir)
    names = [i.name for i in sess.get_inputs()]
    feeds = {n: t.detach().contiguous().numpy() for n, t in zip(names, inputs)}

    def calls(s: Any) -> list[float]:  # 3 warm-up calls, then `repeats` timed ones
        for _ in range(3):
            s.run(None, feeds)
        out = []
        for _ in range(repeats):
            if idle:
                time.sleep(idle)
            t0 = time.perf_counter()
            s.run(None, feeds)
            out.append(time.perf_counter() - t0)
        return out

    wall = calls(sess)
    events = json.loads(Path(sess.end_profiling()).read_text())
    # the same program without the profiler: writing its events costs every kernel tens of
    # us (LLaMA-base b1 s32: 34 ms profiled, 19.6 ms not), so small kernels read slow above
    del sess
    wall_plain = calls(session(profiled=False))
    per_kernel: dict[str, list[float]] = defaultdict(list)
    kop: dict[str, str] = {}
    runs = []
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            k = ev["name"][: -len("_kernel_time")]
            per_kernel[k].append(ev["dur"] * 1e-6)
            kop[k] = ev.get("args", {}).get("op_name", "?")
        elif ev.get("cat") == "Session" and ev["name"] == "model_run":
            runs.append(ev["dur"] * 1e-6)
    runs = runs[3:]
    syms = cm.symbols_from_inputs(g, inputs)
    est = estimate_graph_ort(g, cm.get_device("cpu"), syms, model=False)
    by_op: dict[str, dict] = defaultdict(lambda: {"nodes": 0, "kernels": 0, "prof": 0.0,
                                                  "pred": 0.0, "ort_ops": defaultdict(int)})
    for i, n in enumerate(g.nodes):
        key = f"{n.op} [{op_class(n)}]"
        by_op[key]["nodes"] += 1
        by_op[key]["pred"] += est.node_us[i] * 1e-6
    ir_key = {i: f"{n.op} [{op_class(n)}]" for i, n in enumerate(g.nodes)}
    unmapped = 0.0
    for k, durs in per_kernel.items():
        t = _fast_half(durs[3:] if len(durs) > repeats else durs)
        i = node_ir.get(k, -1)
        if i < 0:
            unmapped += t
            continue
        r = by_op[ir_key[i]]
        r["kernels"] += 1
        r["prof"] += t
        r["ort_ops"][kop[k]] += 1
    kern_sum = sum(r["prof"] for r in by_op.values()) + unmapped
    top = []
    for k, durs in per_kernel.items():
        i = node_ir.get(k, -1)
        top.append((_fast_half(durs[3:] if len(durs) > repeats else durs), kop[k],
                    g.nodes[i].op if i >= 0 else "?", est.node_us[i] * 1e-6 if i >= 0 else 0.0,
                    i))
    top.sort(reverse=True)
    by_ort: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for k, durs in per_kernel.items():
        by_ort[kop[k]][0] += 1
        by_ort[kop[k]][1] += _fast_half(durs[3:] if len(durs) > repeats else durs)
    return {"by_op": by_op, "by_ort": dict(by_ort), "top": top[:8], "unmapped_s": unmapped, "kernels_s": kern_sum,
            "n_kernels": len(per_kernel), "model_run_s": _fast_half(runs) if runs else 0.0,
            "wall_median_s": statistics.median(wall), "wall_min_s": min(wall),
            "unprofiled_median_s": statistics.median(wall_plain),
            "pred_total_s": est.total_us * 1e-6,
            "pred_full_ms": c.predicted_latency_ms(*inputs), "n_ir": len(g.nodes)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--model", required=True, help="zoo model that makes the inputs")
    ap.add_argument("--size", default="base")
    ap.add_argument("--dims", default="", help="symbol values, e.g. batch=1,seq=32")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--idle", type=float, default=0.0,
                    help="seconds idle before each timed call (0: back to back)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    zm = getattr(zoo, a.model)(size=a.size) if a.size != "small" else getattr(zoo, a.model)()
    dims = {k: int(v) for k, v in (kv.split("=") for kv in a.dims.split(",") if kv)}
    r = profile(Path(a.artifact), zm.make_inputs(**dims), a.repeats, a.idle)
    print(f"{a.model} {dims}: {r['n_ir']} IR nodes, {r['n_kernels']} ORT kernels")
    print(f"  call (wall) median {1e3 * r['wall_median_s']:.2f} ms, fastest "
          f"{1e3 * r['wall_min_s']:.2f}; model_run {1e3 * r['model_run_s']:.2f}; kernels "
          f"{1e3 * r['kernels_s']:.2f} (unmapped {1e3 * r['unmapped_s']:.2f}); predicted "
          f"{r['pred_full_ms']:.2f} (nodes {1e3 * r['pred_total_s']:.2f})")
    extra = r["wall_median_s"] - r["unprofiled_median_s"]
    print(f"  without the profiler: call median {1e3 * r['unprofiled_median_s']:.2f} ms (the "
          f"profiler adds {1e3 * extra:.2f} ms, {1e6 * extra / max(1, r['n_kernels']):.1f} us "
          "per kernel: small kernels' profiled times overstate them)")
    print(f"  {'IR op [class]':32s} {'nodes':>5s} {'kern':>5s} {'prof ms':>8s} {'pred ms':>8s}"
          f" {'pred/prof':>9s}  ORT ops")
    rows = sorted(r["by_op"].items(), key=lambda kv: -kv[1]["prof"])
    for key, s in rows:
        ratio = s["pred"] / s["prof"] if s["prof"] > 0 else float("nan")
        ops = ", ".join(f"{o} x{n}" for o, n in sorted(s["ort_ops"].items(), key=lambda x: -x[1]))
        print(f"  {key:32s} {s['nodes']:5d} {s['kernels']:5d} {1e3 * s['prof']:8.3f} "
              f"{1e3 * s['pred']:8.3f} {ratio:9.2f}  {ops}")
    print("  slowest kernels: " + "; ".join(
        f"{o} of IR {iop}#{i} {1e3 * t:.2f} ms (IR node predicted {1e3 * p:.2f})"
        for t, o, iop, p, i in r["top"]))
    print("  by ORT op: " + ", ".join(
        f"{o} {n} x {1e6 * t / n:.1f} us = {1e3 * t:.2f} ms"
        for o, (n, t) in sorted(r["by_ort"].items(), key=lambda kv: -kv[1][1])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
