"""``ember report model.ember -o report.html``: one self-contained HTML page about an artifact.

Sections (plots are PNGs embedded as data URIs, so the page is a single file):

1. Summary: target, backend, pipeline, signature, IR size, tool versions.
2. Cost by op class: the cost model's prediction stored in the manifest at compile time, the
   same model recomputed now from the artifact's IR (`ember.cost_models.estimate_graph`), and a
   MEASURED per-node latency from timing the reference interpreter (eager torch) node by node
   on inputs generated from the signature. The measurement is of the interpreter, not of the
   compiled backend; it shows where time goes op by op.
3. Passes: the pipeline, each pass's record (what it changed), the final IR's op counts.
4. Accuracy and fidelity: the manifest's fidelity record and the planner's verified drop.
5. Backend placement: the backend, program kind and why, fallbacks, the kernel plan.
6. Planner: every candidate as predicted latency vs measured drop, with the budget line.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .ir import Graph, bind_symbols, get_op

__all__ = ["build_report", "write_report", "time_nodes"]

log = logging.getLogger(__name__)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;
 max-width:1120px;color:#1d2430;line-height:1.4}
h1{font-size:24px;margin:0 0 4px} h2{font-size:19px;border-bottom:2px solid #e3e7ee;
 padding-bottom:4px;margin-top:32px} h3{font-size:15px;margin:18px 0 6px}
.sub{color:#5b6575;font-size:13px} .note{color:#5b6575;font-size:12.5px;margin:4px 0 10px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.card{background:#f4f6fa;border-radius:8px;padding:10px 14px;min-width:150px}
.card b{display:block;font-size:18px} .card span{font-size:12px;color:#5b6575}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0 10px;width:100%}
th,td{border-bottom:1px solid #e3e7ee;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f6fa} td.num{text-align:right;font-variant-numeric:tabular-nums}
code{background:#f4f6fa;padding:1px 4px;border-radius:4px;font-size:12px;word-break:break-all}
img{max-width:100%;border:1px solid #e3e7ee;border-radius:6px}
.ok{color:#1a7f37;font-weight:600} .bad{color:#c62828;font-weight:600}
details{margin:4px 0} summary{cursor:pointer;color:#2f5fb3}
"""


# ----------------------------------------------------------------------------- measurement
def time_nodes(g: Graph, inputs: Sequence[torch.Tensor], repeats: int = 3) -> list[float]:
    """Microseconds per node of the reference interpreter (best of ``repeats`` runs).

    Runs the graph op by op with each op's eager-torch reference, timing every call; the
    result is how the interpreter spends its time, not the compiled backend's kernels.
    """
    from ember.ir.interpret import concretize

    steps = []
    for n in g.nodes:
        opdef = get_op(n.op)
        pad = max(0, opdef.max_inputs - len(n.inputs)) if opdef.max_inputs < 64 else 0
        steps.append((n, opdef.reference, pad))
    tensors = [torch.as_tensor(a) for a in inputs]
    env = bind_symbols([v.type.shape for v in g.inputs], [tuple(t.shape) for t in tensors],
                       list(g.input_names or [v.name for v in g.inputs]))
    best = [float("inf")] * len(steps)
    with torch.inference_mode():
        for _ in range(max(1, repeats)):
            vals: dict[str, torch.Tensor] = {v.name: t for v, t in zip(g.inputs, tensors)}
            vals.update(g.weights)
            for i, (n, ref, pad) in enumerate(steps):
                attrs = {k: concretize(a, env) for k, a in n.attrs.items()}
                ins = [None if v is None else vals[v.name] for v in n.inputs] + [None] * pad
                t0 = time.perf_counter()
                out = ref(ins, attrs)
                best[i] = min(best[i], (time.perf_counter() - t0) * 1e6)
                if isinstance(out, torch.Tensor):
                    vals[n.outputs[0].name] = out
                else:
                    for v, t in zip(n.outputs, out):
                        vals[v.name] = t
    return best


# ----------------------------------------------------------------------------- plots
def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img(uri: str | None, alt: str) -> str:
    if uri is None:
        return f'<p class="note">[plot "{_e(alt)}" not drawn: matplotlib is not installed]</p>'
    return f'<img alt="{_e(alt)}" src="{uri}">'


def _plot_classes(series: Mapping[str, Mapping[str, float]]) -> str | None:
    plt = _plt()
    if plt is None:
        return None
    classes = sorted({c for s in series.values() for c in s},
                     key=lambda c: -max(s.get(c, 0.0) for s in series.values()))
    fig, ax = plt.subplots(figsize=(10, 3.6))
    w = 0.8 / max(len(series), 1)
    colors = ["#4c78a8", "#72b7b2", "#f58518", "#e45756"]
    for k, (name, s) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * w for i in range(len(classes))]
        ax.bar(xs, [s.get(c, 0.0) / 1e3 for c in classes], w, label=name,
               color=colors[k % len(colors)])
    ax.set_xticks(range(len(classes)), classes, rotation=20)
    ax.set_ylabel("ms per call")
    ax.set_title("latency by op class")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _plot_ops(counts: Mapping[str, int]) -> str | None:
    plt = _plt()
    if plt is None or not counts:
        return None
    items = sorted(counts.items(), key=lambda kv: -kv[1])[:20]
    fig, ax = plt.subplots(figsize=(10, 3.0))
    ax.bar([k for k, _ in items], [v for _, v in items], color="#4c78a8")
    ax.set_title("final IR: nodes per op")
    ax.tick_params(axis="x", rotation=35, labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def _plot_planner(pl: Mapping[str, Any]) -> str | None:
    plt = _plt()
    recs = [r for r in pl.get("records", []) if r.get("drop") is not None
            and r.get("predicted_ms") is not None]
    if plt is None or not recs:
        return None
    fig, ax = plt.subplots(figsize=(10, 4.2))
    style = {("search", "accepted"): ("#1a7f37", "o", "accepted (search split)"),
             ("search", "rejected"): ("#c62828", "x", "rejected (search split)"),
             ("heldout", "accepted"): ("#2f5fb3", "D", "verified (held-out split)"),
             ("heldout", "rejected"): ("#9c27b0", "D", "failed held-out check")}
    for (split, dec), (color, marker, label) in style.items():
        pts = [r for r in recs if r.get("split", "search") == split and r["decision"] == dec]
        if pts:
            ax.scatter([r["predicted_ms"] for r in pts], [r["drop"] for r in pts], c=color,
                       marker=marker, s=42, label=label, alpha=0.85)
    chosen = next((r for r in recs if r.get("split") == "heldout"
                   and r["decision"] == "accepted"), None)
    if chosen is not None:
        ax.scatter([chosen["predicted_ms"]], [chosen["drop"]], s=320, marker="*",
                   c="#f5b301", edgecolors="black", zorder=5, label="chosen")
    ax.axhline(pl["max_drop"], color="#c62828", ls="--", lw=1.2,
               label=f"budget max_drop={pl['max_drop']}")
    if pl.get("baseline_predicted_ms"):
        ax.axvline(pl["baseline_predicted_ms"], color="#888", ls=":", lw=1, label="base pipeline")
    ax.set_xlabel("predicted latency (ms, cost model)")
    ax.set_ylabel(f"measured drop ({pl.get('metric', '')})")
    top = max([r["drop"] for r in recs] + [pl["max_drop"]])
    ax.set_ylim(min(0.0, min(r["drop"] for r in recs)) - 0.05 * top, top * 1.12)
    ax.set_title("planner candidates")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


# ----------------------------------------------------------------------------- html helpers
def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list | dict):
        s = json.dumps(v, default=str)
        return s if len(s) < 160 else s[:157] + "..."
    return str(v)


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], num: Sequence[int] = ()) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(
            f'<td class="num">{_e(_fmt(c))}</td>' if i in num else f"<td>{_e(_fmt(c))}</td>"
            for i, c in enumerate(r)) + "</tr>")
    return "".join(out) + "</table>"


def _kv(d: Mapping[str, Any]) -> str:
    return _table(["key", "value"], [(k, v) for k, v in d.items()])


def _card(value: Any, label: str) -> str:
    return f'<div class="card"><b>{_e(value)}</b><span>{_e(label)}</span></div>'


# ----------------------------------------------------------------------------- the report
def build_report(path: str | Path, *, measure: bool = True, repeats: int = 3,
                 symbols: Mapping[str, int] | None = None) -> str:
    """The HTML text of the report on artifact ``path``.

    Args:
        path: a ``.ember`` artifact.
        measure: time the reference interpreter node by node (otherwise predictions only).
        repeats: interpreter runs per node (the best is kept).
        symbols: values of symbolic dims for the recomputed estimate and the measurement;
            default: those the manifest's cost record used, else batch 1 / 16.
    """
    from ember import cost_models
    from ember.artifact import read_manifest
    from ember.compiled import load
    from ember.driver import make_example_inputs
    from ember.targets import DEVICE_OF_TARGET

    path = Path(path)
    m = read_manifest(path)
    cm = load(path, fallback="reference")
    g = cm.graph
    placement = m.get("placement") or {}
    cost = placement.get("cost_model") or {}
    syms = dict(cost.get("symbols") or {})
    syms.update(symbols or {})
    example = make_example_inputs(g, syms)
    env = cost_models.symbols_from_inputs(g, example) if g.inputs else {}
    device = cost.get("device") or DEVICE_OF_TARGET.get(m.get("target", "cpu"), "cpu")
    runtime = cost.get("runtime") or "inductor"
    parts: list[str] = []

    # ---- summary
    pl = (m.get("pass_records") or {}).get("planner")
    recomputed = None
    try:
        recomputed = cost_models.estimate_graph(g, device, env, runtime=runtime)
    except Exception as e:  # noqa: BLE001  (an advisory number: say why it is missing)
        log.warning("report: cost model failed on the IR: %s", e)
    ir = m.get("ir_summary") or {}
    cards = [_card(m.get("target"), "target"), _card(m.get("backend"), "backend"),
             _card(ir.get("nodes", len(g.nodes)), "IR nodes"),
             _card(f"{(ir.get('param_bytes') or g.param_bytes()) / 1e6:.2f} MB", "parameters")]
    if cost.get("predicted_ms") is not None:
        cards.append(_card(f"{cost['predicted_ms']:.3f} ms", f"predicted at compile "
                           f"({device}, {runtime})"))
    if pl:
        ok = pl.get("within_budget")
        cards.append(_card(f"{pl.get('heldout_drop', 0):+.4f}",
                           f"held-out {pl.get('metric')} drop ({'within' if ok else 'OVER'} "
                           f"budget {pl.get('max_drop')})"))
        if pl.get("speedup"):
            cards.append(_card(f"{pl['speedup']:.2f}x", "measured speedup vs base"))
    parts.append(f"<h1>Ember report: {_e(path.name)}</h1><div class='sub'>created "
                 f"{_e(m.get('created'))} &middot; format v{_e(m.get('format_version'))} "
                 f"&middot; report generated {_e(time.strftime('%Y-%m-%d %H:%M:%S'))}</div>")
    parts.append('<div class="cards">' + "".join(cards) + "</div>")
    parts.append("<h3>Pipeline</h3><p><code>" + _e(m.get("passes") or "(none)") + "</code></p>")
    sig = [("input", i["name"], i.get("dtype"), i.get("shape")) for i in m.get("inputs", [])]
    sig += [("output", o["name"], o.get("dtype"), o.get("shape")) for o in m.get("outputs", [])]
    parts.append(_table(["", "name", "dtype", "shape"], sig))

    # ---- cost
    parts.append("<h2>1. Where the time goes: cost by op class</h2>")
    series: dict[str, dict[str, float]] = {}
    if cost.get("by_class_us"):
        series["predicted at compile (manifest)"] = dict(cost["by_class_us"])
    if recomputed is not None:
        series["predicted now from ir.json"] = recomputed.by_class()
    node_us: list[float] | None = None
    if measure and g.nodes:
        try:
            node_us = time_nodes(g, example, repeats)
        except Exception as e:  # noqa: BLE001
            log.warning("report: node timing failed: %s", e)
            parts.append(f"<p class='note'>Node timing failed: {_e(e)}</p>")
    if node_us is not None:
        by: dict[str, float] = {}
        for n, us in zip(g.nodes, node_us):
            c = cost_models.op_class(n)
            by[c] = by.get(c, 0.0) + us
        series["measured: reference interpreter, node by node"] = by
    sym_txt = ", ".join(f"{k}={v}" for k, v in env.items()) or "static shapes"
    parts.append(f"<p class='note'>Device <b>{_e(device)}</b>, runtime {_e(runtime)}, at "
                 f"{_e(sym_txt)}. The measured series times each node of the reference "
                 f"interpreter (eager torch, best of {repeats}) on random inputs generated from "
                 f"the signature: it is not the compiled {_e(m.get('backend'))} program, whose "
                 f"kernels fuse nodes.</p>")
    if series:
        parts.append(_img(_plot_classes(series), "latency by op class"))
        classes = sorted({c for s in series.values() for c in s})
        names = list(series)
        rows = [[c] + [series[n].get(c, 0.0) / 1e3 for n in names] for c in classes]
        rows.sort(key=lambda r: -max(r[1:]))
        tot = ["total"] + [sum(series[n].values()) / 1e3 for n in names]
        parts.append(_table(["op class"] + [f"{n} (ms)" for n in names], rows + [tot],
                            num=range(1, len(names) + 1)))
    if recomputed is not None or node_us is not None:
        pred = list(recomputed.node_us) if recomputed is not None else [0.0] * len(g.nodes)
        meas = node_us or [0.0] * len(g.nodes)
        key = meas if node_us is not None else pred
        top = sorted(range(len(g.nodes)), key=lambda i: -key[i])[:12]
        rows = [(g.nodes[i].outputs[0].name, g.nodes[i].op, cost_models.op_class(g.nodes[i]),
                 pred[i], meas[i] if node_us is not None else "-") for i in top]
        parts.append("<h3>Costliest nodes</h3>" + _table(
            ["node", "op", "class", "predicted us (node share)", "measured us (interpreter)"],
            rows, num=(3, 4)))

    # ---- passes
    parts.append("<h2>2. Passes and their effect</h2>")
    records = {k: v for k, v in (m.get("pass_records") or {}).items() if k != "planner"}
    parts.append(f"<p>Final IR: <b>{_e(ir.get('nodes', len(g.nodes)))}</b> nodes, "
                 f"{_e(ir.get('params', len(g.params)))} parameters. Steps: "
                 f"{_e(len([s for s in str(m.get('passes') or '').split(',') if s]))} in the "
                 f"pipeline text.</p>")
    pipe_rec = records.pop("pipeline", None) or records.pop("pass_manager", None)
    if isinstance(pipe_rec, Mapping) and isinstance(pipe_rec.get("steps"), list):
        parts.append(_table(["pass", "nodes before", "nodes after", "seconds"],
                            [(s.get("pass"), s.get("nodes_before"), s.get("nodes_after"),
                              s.get("seconds")) for s in pipe_rec["steps"]], num=(1, 2, 3)))
    if records:
        rows = []
        for name, rec in records.items():
            if isinstance(rec, Mapping):
                brief = {k: v for k, v in rec.items() if not isinstance(v, list | dict)}
                rows.append((name, ", ".join(f"{k}={_fmt(v)}" for k, v in brief.items())))
            else:
                rows.append((name, rec))
        parts.append(_table(["pass", "record"], rows))
        for name, rec in records.items():
            parts.append(f"<details><summary>{_e(name)}: full record</summary><pre>"
                         f"{_e(json.dumps(rec, indent=1, default=str)[:20000])}</pre></details>")
    else:
        parts.append("<p class='note'>No pass left a record (exact passes only).</p>")
    parts.append(_img(_plot_ops(ir.get("ops") or g.op_counts()), "op counts"))

    # ---- accuracy
    parts.append("<h2>3. Accuracy and fidelity</h2>")
    fid = m.get("fidelity") or {}
    if fid:
        parts.append(_kv(fid))
    else:
        parts.append("<p class='note'>No fidelity check was recorded.</p>")
    if pl:
        ok = pl.get("within_budget")
        parts.append(
            f"<p>Planner ({_e(pl.get('metric'))}): fp32 {_fmt(pl.get('baseline_score'))}, "
            f"compiled {_fmt(pl.get('score'))} on {_e(pl.get('n_heldout'))} held-out samples "
            f"&rarr; drop <b>{_fmt(pl.get('heldout_drop'))}</b> (search split "
            f"{_fmt(pl.get('search_drop'))}), budget {_e(pl.get('max_drop'))}: "
            f"<span class='{'ok' if ok else 'bad'}'>{'within budget' if ok else 'OVER'}</span>"
            f"</p>")

    # ---- placement
    parts.append("<h2>4. Backend placement</h2>")
    prog = placement.get("program") or m.get("backend_info") or {}
    rows = [("backend", placement.get("backend", m.get("backend"))),
            ("program", prog.get("chosen") or prog.get("kind")),
            ("why", prog.get("why") or prog.get("reason") or "")]
    fb = placement.get("fallback")
    if fb:
        rows.append(("fallback", f"{fb.get('from')} -> {fb.get('to')}: {fb.get('reason')}"))
    parts.append(_table(["", ""], rows))
    other = {k: v for k, v in placement.items()
             if k not in ("backend", "program", "fallback", "cost_model")}
    if other:
        parts.append(_kv(other))
    if prog:
        parts.append("<details><summary>program info</summary><pre>"
                     f"{_e(json.dumps(prog, indent=1, default=str)[:20000])}</pre></details>")

    # ---- planner
    parts.append("<h2>5. Accuracy-budget planner</h2>")
    if not pl:
        parts.append("<p class='note'>This artifact was compiled without a planner "
                     "(no --max-drop).</p>")
    else:
        sp = f"{pl['speedup']:.2f}x" if pl.get("speedup") else "not measured"
        parts.append(f"<p>Chosen: <code>{_e(pl.get('pipeline'))}</code><br>predicted "
                     f"{_fmt(pl.get('baseline_predicted_ms'))} &rarr; "
                     f"{_fmt(pl.get('predicted_ms'))} ms "
                     f"({_fmt(pl.get('predicted_speedup'))}x); measured speedup {_e(sp)}"
                     f" ({_e(pl.get('latency_backend'))} backend, "
                     f"{_fmt(pl.get('baseline_measured_ms'))} &rarr; "
                     f"{_fmt(pl.get('measured_ms'))} ms); {_e(pl.get('candidates'))} candidates,"
                     f" {_e(pl.get('candidates_measured'))} measured in "
                     f"{_fmt(pl.get('search_s'))} s.</p>")
        parts.append(_img(_plot_planner(pl), "planner candidates"))
        parts.append(_table(
            ["stage", "decision", "predicted ms", "drop", "split", "steps", "reason"],
            [(r.get("stage"), r.get("decision"), r.get("predicted_ms"), r.get("drop"),
              r.get("split"), ",".join(r.get("steps") or []) or "(base)", r.get("reason"))
             for r in pl.get("records", [])], num=(2, 3)))

    versions = m.get("tool_versions") or {}
    parts.append("<h2>Tools</h2><p class='note'>" + _e(", ".join(
        f"{k} {v}" for k, v in versions.items())) + "</p>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Ember report: "
            f"{_e(path.name)}</title><style>{_CSS}</style></head><body>"
            + "\n".join(parts) + "</body></html>")


def write_report(path: str | Path, out: str | Path, **kw: Any) -> Path:
    """Writes `build_report` of ``path`` to ``out``; returns ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(build_report(path, **kw), encoding="utf-8")
    log.info("wrote %s", out)
    return out
