"""Measured kernels and the learned residual correction of the analytical model.

Commands::

    python -m ember.cost_models.measured collect [-o kernels.json] [--quick] [--threads 2]
    python -m ember.cost_models.measured fit kernels.json [-o cost_models/data/cpu_correction.json]
    python -m ember.cost_models.measured eval kernels.json [--model cpu_correction.json]

``collect`` times single IR ops (linear, matmul, conv, depthwise conv, attention, layer_norm,
softmax, elementwise) at many shapes with the torch kernels the CPU backend calls, and stores
each with its analytical estimate and kernel features (`analytical.group_features`).
``fit`` fits a small gradient-boosted regressor (sklearn, fit only) on
``log(measured / analytical)`` and writes it as JSON: every tree as flat arrays (children,
feature, threshold, value). `Correction` loads that JSON and predicts with plain Python: no
pickle, no sklearn at run time. The correction multiplies each kernel's analytical latency.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .analytical import estimate_graph, group_features, node_cost
from .devices import DeviceSpec, get_device

__all__ = [
    "Correction",
    "CORRECTION_VERSION",
    "DEFAULT_CORRECTION",
    "FEATURES",
    "collect",
    "fit",
    "load_correction",
    "kernel_cases",
]

log = logging.getLogger(__name__)

CORRECTION_VERSION = 1
DEFAULT_CORRECTION = Path(__file__).parent / "data" / "cpu_correction.json"
FEATURES = ("cls", "log_flops", "log_bytes", "log_ai", "log_m", "log_n", "log_k", "log_out",
            "n_nodes", "dtype_bytes", "compute_bound")
# the correction never moves a kernel's estimate by more than this factor either way
MAX_LOG_FACTOR = math.log(20.0)


# ----------------------------------------------------------------------------- correction
@dataclass(frozen=True)
class Correction:
    """A gradient-boosted regressor over kernel features, predicting log(measured/analytical).

    Attributes:
        features: feature names in column order.
        init: the model's constant start value.
        learning_rate: shrinkage of every tree.
        trees: each tree as a dict of equal-length lists ``left``, ``right``, ``feature``,
            ``threshold``, ``value`` (leaf: ``left == -1``; go left when x <= threshold).
        meta: provenance (device, dataset size, fit metrics, version of sklearn used to fit).
    """

    features: tuple[str, ...]
    init: float
    learning_rate: float
    trees: tuple[Mapping[str, Sequence[float]], ...]
    meta: Mapping[str, Any]

    def log_factor(self, feats: Mapping[str, float]) -> float:
        x = [float(feats.get(f, 0.0)) for f in self.features]
        s = self.init
        for t in self.trees:
            left, right, feat, thr, val = (t["left"], t["right"], t["feature"], t["threshold"],
                                           t["value"])
            i = 0
            while left[i] != -1:
                i = left[i] if x[int(feat[i])] <= thr[i] else right[i]
            s += self.learning_rate * val[i]
        return max(-MAX_LOG_FACTOR, min(MAX_LOG_FACTOR, s))

    def factor(self, feats: Mapping[str, float]) -> float:
        """Multiplier on the analytical latency of a kernel with these features."""
        return math.exp(self.log_factor(feats))

    __call__ = factor

    def to_json(self) -> dict[str, Any]:
        return {"format": "ember-gbrt", "version": CORRECTION_VERSION,
                "features": list(self.features), "init": self.init,
                "learning_rate": self.learning_rate,
                "trees": [{k: list(v) for k, v in t.items()} for t in self.trees],
                "meta": dict(self.meta)}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> Correction:
        if d.get("format") != "ember-gbrt":
            raise ValueError("not an Ember correction model (format != 'ember-gbrt')")
        if d.get("version") != CORRECTION_VERSION:
            raise ValueError(f"correction model version {d.get('version')} is not "
                             f"{CORRECTION_VERSION}; refit it with `measured fit`")
        trees = []
        for t in d["trees"]:
            n = len(t["left"])
            if any(len(t[k]) != n for k in ("right", "feature", "threshold", "value")):
                raise ValueError("malformed tree in correction model")
            trees.append({"left": [int(v) for v in t["left"]],
                          "right": [int(v) for v in t["right"]],
                          "feature": [int(v) for v in t["feature"]],
                          "threshold": [float(v) for v in t["threshold"]],
                          "value": [float(v) for v in t["value"]]})
        return Correction(tuple(d["features"]), float(d["init"]), float(d["learning_rate"]),
                          tuple(trees), dict(d.get("meta", {})))

    def save(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_json(), separators=(",", ":")))
        return p

    @property
    def kernel_overhead_ratio(self) -> float | None:
        """Fitted per-kernel overhead of compiled (Inductor) programs / tiny-op overhead."""
        v = self.meta.get("kernel_overhead_ratio")
        return None if v is None else float(v)


def gbr_to_trees(gbr: Any, x: Any) -> tuple[float, list[dict[str, list]]]:
    """A fitted sklearn GradientBoostingRegressor as (init, flat trees) for `Correction`:
    children, feature, threshold and leaf value arrays per tree (plain JSON, no pickle)."""
    init = float(gbr._raw_predict_init(x[:1]).ravel()[0])
    trees = []
    for est in gbr.estimators_[:, 0]:
        t = est.tree_
        trees.append({"left": t.children_left.tolist(), "right": t.children_right.tolist(),
                      "feature": [max(0, int(f)) for f in t.feature],
                      "threshold": [float(v) for v in t.threshold],
                      "value": [float(v) for v in t.value[:, 0, 0]]})
    return init, trees


_LOADED: dict[str, Correction | None] = {}


def load_json_model(p: Path, parse: Callable[[Any], Any], cache: dict[str, Any],
                    what: str) -> Any:
    """``parse(json of p)``, cached per path; None (logged) when the file is absent, or when it
    is of another version or malformed (``parse`` raises ValueError/KeyError/TypeError)."""
    key = str(p)
    if key not in cache:
        try:
            cache[key] = parse(json.loads(p.read_text()))
        except FileNotFoundError:
            log.info("no %s at %s; using the bare roofline", what, p)
            cache[key] = None
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring %s %s: %s", what, p, e)
            cache[key] = None
    return cache[key]


def load_correction(path: str | os.PathLike | None = None) -> Correction | None:
    """The committed CPU correction (or ``path``); None when the file is absent or stale."""
    p = Path(path) if path is not None else DEFAULT_CORRECTION
    return load_json_model(p, Correction.from_json, _LOADED, "correction model")


# ----------------------------------------------------------------------------- kernel cases
def kernel_cases(quick: bool = False) -> Iterator[tuple[str, dict[str, Any]]]:
    """(family, case) pairs: the shapes ``collect`` measures (quick: a small subset)."""
    step = 3 if quick else 1
    lin_shapes = [(64, 64), (256, 256), (768, 768), (768, 3072), (3072, 768), (1024, 1024),
                  (512, 2048), (32, 128)]
    for i, (m, (k, n)) in enumerate((m, kn) for m in (1, 4, 16, 64, 256, 1024, 4096)
                                    for kn in lin_shapes):
        if i % step == 0 and 2 * m * k * n <= 1.5e9:
            yield "linear", {"m": m, "k": k, "n": n, "bias": i % 2 == 0}
    for i, (b, ln, d) in enumerate((b, ln, d) for b in (4, 12, 48) for ln in (16, 64, 128, 256)
                                  for d in (32, 64)):
        if i % step == 0:
            yield "matmul", {"b": b, "m": ln, "k": d, "n": ln}
    for i, (n, c, hw, k, s) in enumerate((n, c, hw, k, s) for n in (1, 4) for c in (16, 64, 256)
                                         for hw in (7, 14, 28, 56) for k in (1, 3)
                                         for s in (1, 2)):
        if i % step == 0 and n * c * c * hw * hw * k * k / (s * s) <= 4e8:
            yield "conv", {"n": n, "cin": c, "cout": c if k == 3 else 2 * c, "hw": hw, "k": k,
                           "stride": s, "groups": 1}
    for i, (n, c, hw, s) in enumerate((n, c, hw, s) for n in (1, 4) for c in (32, 96, 384)
                                      for hw in (7, 14, 28, 56, 112) for s in (1, 2)):
        if i % (step * 2) == 0:
            yield "conv", {"n": n, "cin": c, "cout": c, "hw": hw, "k": 3, "stride": s,
                           "groups": c}
    for i, (bh, ln, d, causal) in enumerate((bh, ln, d, c) for bh in (4, 12, 24)
                                           for ln in (16, 64, 128, 256, 512) for d in (32, 64)
                                           for c in (False, True)):
        if i % step == 0:
            yield "attention", {"b": 1, "h": bh, "l": ln, "d": d, "causal": causal}
    for i, (rows, h) in enumerate((r, h) for r in (16, 128, 1024, 8192)
                                  for h in (32, 256, 768, 1024)):
        if i % step == 0:
            yield "layer_norm", {"rows": rows, "h": h}
            yield "softmax", {"rows": rows * 4, "h": h // 4 if h > 64 else h}
    for i, (op, n) in enumerate((op, n) for op in ("add", "mul", "gelu", "relu", "silu")
                                for n in (1_000, 30_000, 300_000, 3_000_000)):
        if i % step == 0:
            yield "elementwise", {"op": op, "n": n}


def _case_graph(family: str, c: Mapping[str, Any]) -> Any:
    import torch

    from ember.ir import GraphBuilder, TensorType

    gen = torch.Generator().manual_seed(0)
    b = GraphBuilder(family)
    f32 = "float32"
    if family == "linear":
        x = b.add_input("x", TensorType(f32, (c["m"], c["k"])))
        w = b.add_param("w", torch.randn(c["n"], c["k"], generator=gen) * 0.05)
        ins = [x, w] + ([b.add_param("b", torch.randn(c["n"], generator=gen))] if c["bias"]
                        else [])
        y = b.op("linear", ins)
    elif family == "matmul":
        x = b.add_input("a", TensorType(f32, (c["b"], c["m"], c["k"])))
        w = b.add_input("b", TensorType(f32, (c["b"], c["k"], c["n"])))
        y = b.op("matmul", [x, w])
    elif family == "conv":
        x = b.add_input("x", TensorType(f32, (c["n"], c["cin"], c["hw"], c["hw"])))
        w = b.add_param("w", torch.randn(c["cout"], c["cin"] // c["groups"], c["k"], c["k"],
                                         generator=gen) * 0.05)
        y = b.op("conv", [x, w], {"stride": c["stride"], "padding": c["k"] // 2,
                                  "groups": c["groups"]})
    elif family == "attention":
        shape = (c["b"], c["h"], c["l"], c["d"])
        q, k, v = (b.add_input(n, TensorType(f32, shape)) for n in "qkv")
        y = b.op("attention", [q, k, v], {"is_causal": c["causal"]})
    elif family == "layer_norm":
        x = b.add_input("x", TensorType(f32, (c["rows"], c["h"])))
        g = b.add_param("g", torch.ones(c["h"]))
        bb = b.add_param("b", torch.zeros(c["h"]))
        y = b.op("layer_norm", [x, g, bb])
    elif family == "softmax":
        x = b.add_input("x", TensorType(f32, (c["rows"], c["h"])))
        y = b.op("softmax", [x], {"dim": -1})
    elif family == "elementwise":
        x = b.add_input("x", TensorType(f32, (c["n"],)))
        y = b.op(c["op"], [x, x] if c["op"] in ("add", "mul") else [x])
    else:
        raise ValueError(family)
    b.set_outputs([y])
    return b.build()


def _median_time(fn: Any, budget_s: float, min_runs: int = 10) -> tuple[float, float]:
    """(median seconds, relative IQR) of ``fn()`` over >= min_runs runs or ``budget_s``."""
    fn()
    t0 = time.perf_counter()
    fn()
    if time.perf_counter() - t0 > 0.05:   # slow kernel: fewer runs (the median is stable)
        min_runs = max(5, min_runs // 2)
    times: list[float] = []
    t_end = time.perf_counter() + budget_s
    while len(times) < min_runs or (time.perf_counter() < t_end and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    med = statistics.median(times)
    iqr = times[3 * len(times) // 4] - times[len(times) // 4]
    return med, iqr / med if med > 0 else 0.0


def _kernel_fn(g: Any) -> Any:
    """The torch call the CPU backend makes for the graph's one node."""
    import torch

    from ember.backends.cpu.lowering import LOWERINGS
    from ember.ir import get_op

    n = g.nodes[0]
    fn = LOWERINGS.get(n.op) or get_op(n.op).reference
    gen = torch.Generator().manual_seed(1)
    env: dict[str, torch.Tensor] = {v.name: torch.randn(*v.type.shape, generator=gen)
                                    for v in g.inputs}
    env.update(g.weights)
    ins: list[Any] = [None if v is None else env[v.name] for v in n.inputs]
    # references index optional operands (bias) positionally: pad with None like the IR does
    ins += [None] * (min(get_op(n.op).max_inputs, 3) - len(ins))
    attrs = dict(n.attrs)

    def run() -> Any:
        with torch.inference_mode():
            return fn(ins, attrs)
    return run


def collect(out: str | os.PathLike, *, quick: bool = False, threads: int = 2,
            budget_s: float = 0.25, device: DeviceSpec | None = None) -> dict[str, Any]:
    """Measures every `kernel_cases` kernel; writes and returns the dataset."""
    import torch

    torch.set_num_threads(threads)
    dev = device or get_device("cpu", threads=threads)
    records = []
    t_start = time.perf_counter()
    cases = list(kernel_cases(quick))
    for i, (family, case) in enumerate(cases):
        g = _case_graph(family, case)
        med, noise = _median_time(_kernel_fn(g), budget_s)
        est = estimate_graph(g, dev, {}, runtime="eager")
        costs = [node_cost(n) for n in g.nodes]
        feats = group_features(g, [0], costs, {}, est.flops, est.bytes, dev)
        records.append({"family": family, "case": case, "op": g.nodes[0].op,
                        "measured_s": med, "noise_iqr": noise,
                        "analytical_s": est.total_us / 1e6, "features": feats})
        if (i + 1) % 25 == 0:
            log.info("collected %d/%d kernels (%.0f s)", i + 1, len(cases),
                     time.perf_counter() - t_start)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = -1.0
    doc = {"format": "ember-kernels", "version": 1, "device": dev.to_json(),
           "threads": threads, "torch": torch.__version__, "loadavg_1m_end": load,
           "seconds": time.perf_counter() - t_start, "records": records}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(doc, indent=0))
    log.info("wrote %d kernel records to %s", len(records), out)
    return doc


# ----------------------------------------------------------------------------- fit
def _xy(records: Sequence[Mapping[str, Any]]) -> tuple[list[list[float]], list[float]]:
    xs = [[float(r["features"].get(f, 0.0)) for f in FEATURES] for r in records]
    ys = [math.log(r["measured_s"] / r["analytical_s"]) for r in records]
    return xs, ys


def fit(dataset: str | os.PathLike | Mapping[str, Any], out: str | os.PathLike | None = None,
        *, n_estimators: int = 120, max_depth: int = 3, learning_rate: float = 0.1,
        seed: int = 0) -> Correction:
    """Fits the residual model on a `collect` dataset; saves it as JSON when ``out`` is set.

    sklearn's `GradientBoostingRegressor` does the fitting; its trees are exported to flat
    arrays, and the exported model is checked against sklearn's own predictions.
    """
    import numpy as np
    import sklearn
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.model_selection import KFold, cross_val_predict

    doc = dataset if isinstance(dataset, Mapping) else json.loads(Path(dataset).read_text())
    recs = [r for r in doc["records"] if r["measured_s"] > 0 and r["analytical_s"] > 0]
    xs, ys = _xy(recs)
    x, y = np.asarray(xs), np.asarray(ys)
    params = dict(n_estimators=n_estimators, max_depth=max_depth, learning_rate=learning_rate,
                  subsample=0.8, loss="huber", random_state=seed, min_samples_leaf=3)
    cv = KFold(5, shuffle=True, random_state=seed)
    pred_cv = cross_val_predict(GradientBoostingRegressor(**params), x, y, cv=cv)
    gbr = GradientBoostingRegressor(**params).fit(x, y)
    init, trees = gbr_to_trees(gbr, x)

    def within(pred: Any) -> float:
        ratio = np.exp(np.asarray(pred) - y)   # predicted / measured
        return float(np.mean(np.abs(ratio - 1.0) <= 0.10))

    meta = {
        "device": doc["device"].get("notes", ""), "threads": doc.get("threads"),
        "n_records": len(recs), "sklearn": sklearn.__version__,
        "fit_params": {k: v for k, v in params.items()},
        "within10_roofline": within(np.zeros_like(y)),
        "within10_cv": within(pred_cv),
        "within10_train": within(gbr.predict(x)),
        "median_abs_log_err_roofline": float(np.median(np.abs(y))),
        "median_abs_log_err_cv": float(np.median(np.abs(pred_cv - y))),
        "loadavg_1m_during_collect": doc.get("loadavg_1m_end"),
        # the analytical side of every residual used this spec: predictions pair them
        "device_spec": doc["device"],
    }
    corr = Correction(FEATURES, init, float(learning_rate), tuple(trees), meta)
    # the exported trees must reproduce sklearn (before clipping) to float precision
    ours = np.array([_raw(corr, dict(zip(FEATURES, row))) for row in xs])
    if not np.allclose(ours, gbr.predict(x), atol=1e-9):
        raise RuntimeError("exported trees disagree with sklearn's predictions")
    log.info("fit on %d kernels: within 10%% roofline %.0f%%, cv %.0f%%, train %.0f%%",
             len(recs), 100 * meta["within10_roofline"], 100 * meta["within10_cv"],
             100 * meta["within10_train"])
    if out is not None:
        corr.save(out)
    return corr


def _raw(c: Correction, feats: Mapping[str, float]) -> float:
    """Unclipped prediction (used to check the export)."""
    x = [float(feats.get(f, 0.0)) for f in c.features]
    s = c.init
    for t in c.trees:
        i = 0
        while t["left"][i] != -1:
            i = t["left"][i] if x[int(t["feature"][i])] <= t["threshold"][i] else t["right"][i]
        s += c.learning_rate * t["value"][i]
    return s


def evaluate_dataset(dataset: str | os.PathLike, model: Correction | None) -> dict[str, float]:
    """Share of kernels within 10% with and without the correction."""
    doc = json.loads(Path(dataset).read_text())
    recs = doc["records"]
    n = len(recs)
    base = sum(abs(r["analytical_s"] / r["measured_s"] - 1) <= 0.1 for r in recs) / n
    corr = base
    if model is not None:
        corr = sum(abs(r["analytical_s"] * model.factor(r["features"]) / r["measured_s"] - 1)
                   <= 0.1 for r in recs) / n
    return {"n": n, "within10_roofline": base, "within10_corrected": corr}


# ----------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ember.cost_models.measured",
                                 description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="time kernels on this CPU into a JSON dataset")
    c.add_argument("-o", "--out", default="cpu_kernels.json")
    c.add_argument("--quick", action="store_true", help="a small subset of shapes")
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--budget", type=float, default=0.25, help="seconds per kernel")
    c.add_argument("--refresh-device", action="store_true",
                   help="re-measure the device spec first")
    f = sub.add_parser("fit", help="fit the residual correction on a dataset")
    f.add_argument("dataset")
    f.add_argument("-o", "--out", default=str(DEFAULT_CORRECTION))
    e = sub.add_parser("eval", help="share of kernels within 10%% of measured")
    e.add_argument("dataset")
    e.add_argument("--model", default=str(DEFAULT_CORRECTION))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "collect":
        dev = get_device("cpu", threads=args.threads, refresh=args.refresh_device)
        collect(args.out, quick=args.quick, threads=args.threads, budget_s=args.budget,
                device=dev)
    elif args.cmd == "fit":
        corr = fit(args.dataset, args.out)
        json.dump({k: v for k, v in corr.meta.items() if k not in ("fit_params", "device_spec")},
                  sys.stdout,
                  indent=1)
        sys.stdout.write("\n")
    else:
        res = evaluate_dataset(args.dataset, load_correction(args.model))
        json.dump(res, sys.stdout, indent=1)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
