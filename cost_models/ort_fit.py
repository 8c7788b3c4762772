"""Fit of the learned ONNX Runtime latency model (`ember.cost_models.ort.OrtModel`).

Reads a dataset of per-node ORT kernel times (collected by ``examples/ort_collect.py``: rows
of graph, symbol point, end-to-end seconds and per-IR-node kernel seconds, roofline and
features), regresses ``e2e - sum(kernels)`` on the kernel count and graph I/O count (the
per-call and per-kernel overheads), fits gradient-boosted trees on every node's
``log(measured / roofline)``, and reports graph-level accuracy on held-out graphs.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .measured import gbr_to_trees
from .ort import ORT_FEATURES, OrtModel

__all__ = ["fit"]

log = logging.getLogger(__name__)


def _e2e(r: Mapping[str, Any], stat: str) -> float:
    """A row's end-to-end seconds: "median", "p25", "p10" or "min" (on a machine shared with
    other work a low quantile estimates the uncontended latency)."""
    xs = r.get("e2e_all")
    if stat == "median" or not xs:
        return float(r["e2e_s"])
    return float(xs[{"min": 0, "p10": len(xs) // 10}.get(stat, len(xs) // 4)])


def _node_t(nd: Mapping[str, Any], stat: str) -> float:
    """A node's kernel seconds (the mean of its faster half of runs; ``stat`` is the e2e's)."""
    return float(nd["t"])


def _overheads(rows: Sequence[Mapping[str, Any]], stat: str) -> tuple[float, float, float]:
    """Robust (least absolute deviation) fit of e2e - sum(kernels) on [1, kernels, io]:
    (call, per kernel, per io) seconds. Least squares would chase the preempted outliers.
    The per-kernel term may come out negative: profiled kernel durations carry the
    profiler's own timing cost, which plain calls do not pay."""
    import numpy as np
    from sklearn.linear_model import QuantileRegressor

    a = np.array([[sum(nd["k"] for nd in r["nodes"]) + r["other_k"], r["n_io"]]
                  for r in rows], dtype=float)
    y = np.array([_e2e(r, stat) - sum(_node_t(nd, stat) for nd in r["nodes"]) - r["other_s"]
                  for r in rows]) * 1e6
    q = QuantileRegressor(quantile=0.5, alpha=0.0, solver="highs").fit(a, y)
    per_k, per_io = float(q.coef_[0]) * 1e-6, max(0.0, float(q.coef_[1])) * 1e-6
    return max(0.0, float(q.intercept_)) * 1e-6, per_k, per_io


def _node_xy(rows: Sequence[Mapping[str, Any]], per_k: float,
             stat: str) -> tuple[Any, Any, Any, Any]:
    import numpy as np

    xs, ys, ws, gid = [], [], [], []
    for r in rows:
        for nd in r["nodes"]:
            t = max(_node_t(nd, stat) + per_k * nd["k"], 0.05 * _node_t(nd, stat), 1e-7)
            xs.append(nd["f"])
            ys.append(math.log(t / nd["roof"]))
            ws.append(math.sqrt(t))
            gid.append(r["graph"])
    return np.asarray(xs), np.asarray(ys), np.asarray(ws), np.asarray(gid)


def _gbr(seed: int) -> Any:
    from sklearn.ensemble import GradientBoostingRegressor

    return GradientBoostingRegressor(n_estimators=300, max_depth=4, learning_rate=0.08,
                                     subsample=0.8, loss="huber", min_samples_leaf=4,
                                     random_state=seed)


def _graph_pred(rows: Sequence[Mapping[str, Any]], logf: Sequence[float], call: float,
                per_io: float) -> list[float]:
    out, j = [], 0
    for r in rows:
        s = call + per_io * r["n_io"]
        for nd in r["nodes"]:
            s += nd["roof"] * math.exp(max(-math.log(50), min(math.log(50), logf[j])))
            j += 1
        out.append(s)
    return out


def fit(dataset: str | os.PathLike | Mapping[str, Any], out: str | os.PathLike | None = None,
        *, seed: int = 0, stat: str = "p10") -> OrtModel:
    """Fits the overhead terms and the per-node trees; saves the JSON model when ``out``."""
    import numpy as np
    import sklearn
    from sklearn.model_selection import GroupKFold

    from .measured import Correction

    doc = dataset if isinstance(dataset, Mapping) else json.loads(Path(dataset).read_text())
    rows = doc["rows"]
    call, per_k, per_io = _overheads(rows, stat)
    x, y, _, gid = _node_xy(rows, per_k, stat)
    # held-out graphs: every fold's trees never saw the graphs they predict
    cv_logf = np.zeros_like(y)
    for tr, te in GroupKFold(5).split(x, y, gid):
        cv_logf[te] = _gbr(seed).fit(x[tr], y[tr]).predict(x[te])
    # unweighted: weighting nodes by their time let the big, noisier kernels dominate and
    # predicted held-out graphs worse (22% vs 31% within 10% on the committed dataset)
    gbr = _gbr(seed).fit(x, y)
    meas = np.array([_e2e(r, stat) for r in rows])

    def within(pred: Sequence[float]) -> float:
        return float(np.mean(np.abs(np.asarray(pred) / meas - 1) <= 0.10))
    pred_cv = _graph_pred(rows, cv_logf, call, per_io)
    pred_tr = _graph_pred(rows, gbr.predict(x), call, per_io)
    pred_roof = [sum(nd["roof"] for nd in r["nodes"]) for r in rows]
    init, trees = gbr_to_trees(gbr, x)
    meta = {
        "n_graphs": len({r["graph"] for r in rows}), "n_points": len(rows), "n_nodes": len(y),
        "sklearn": sklearn.__version__, "threads": doc.get("threads"),
        "per_kernel_gap_s": per_k, "e2e_statistic": stat,
        "collect_loadavg_1m": doc.get("loadavg_1m"),
        "median_e2e_iqr": float(np.median([r["e2e_iqr"] for r in rows])),
        "within10_graph_cv": within(pred_cv), "within10_graph_train": within(pred_tr),
        "within10_graph_roofline": within(pred_roof),
        "median_abs_err_graph_cv": float(np.median(np.abs(np.asarray(pred_cv) / meas - 1))),
    }
    corr = Correction(tuple(ORT_FEATURES), init, float(gbr.learning_rate), tuple(trees),
                      {"target": "log(ort node time / roofline)"})
    from .measured import _raw

    ours = np.array([_raw(corr, dict(zip(ORT_FEATURES, row))) for row in x[:200]])
    if not np.allclose(ours, gbr.predict(x[:200]), atol=1e-9):
        raise RuntimeError("exported trees disagree with sklearn's predictions")
    model = OrtModel(corr, call, per_io, doc["device"], meta)
    log.info("overheads: call %.1f us, per kernel %.2f us, per io %.2f us", call * 1e6,
             per_k * 1e6, per_io * 1e6)
    log.info("graph-level within 10%%: held-out %.0f%%, train %.0f%%, roofline %.0f%%",
             100 * meta["within10_graph_cv"], 100 * meta["within10_graph_train"],
             100 * meta["within10_graph_roofline"])
    if out is not None:
        model.save(out)
    return model
