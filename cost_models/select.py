"""Backend choice: partition a graph by backend support and predicted cost, with transfers.

Each candidate backend brings a support predicate (``supports(node) -> Support(ok, reason)``,
from `ember.backends.registry` or a plain mapping) and a device spec. Placement is a shortest
path over (node, backend) states in topological order (a Viterbi pass over ``graph.to_nx()``'s
order): the cost of running node i on backend b is its roofline estimate on b's device, and
every tensor that crosses from one device to another pays ``latency + bytes / link_bw``
(PCIe between host and GPU, the Fiddler rule: move the computation or move the data, whichever
is cheaper). Unsupported (node, backend) pairs are infinitely expensive. Ties go to the
earlier backend in the caller's preference order, so placement is deterministic.

The result lists every node's backend with the reason (the predicted costs it compared, or the
support failure), then the contiguous partitions for the artifact manifest.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ember.ir import Graph

from .analytical import estimate_node, node_cost, physical_bytes
from .devices import DeviceSpec

__all__ = ["BackendOption", "Placement", "PlacementRecord", "choose_placement",
           "transfer_s", "options_from_registry"]

log = logging.getLogger(__name__)

SupportFn = Callable[[Any], Any]


@dataclass(frozen=True)
class BackendOption:
    """One candidate: a backend name, its support predicate and the device it runs on.

    ``supports`` returns an object with ``ok`` and ``reason`` (``Support``) or a bool.
    ``available`` is False (with ``reason``) when the backend cannot run here at all.
    """

    name: str
    supports: SupportFn
    device: DeviceSpec
    available: bool = True
    reason: str = ""


@dataclass(frozen=True)
class PlacementRecord:
    """Why one node went where it went (JSON-able via `to_json`)."""

    node: int
    op: str
    backend: str
    reason: str
    predicted_us: Mapping[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "op": self.op, "backend": self.backend,
                "reason": self.reason,
                "predicted_us": {k: (round(v, 3) if math.isfinite(v) else None)
                                 for k, v in self.predicted_us.items()}}


@dataclass(frozen=True)
class Placement:
    """Node -> backend, the contiguous partitions, and the predicted cost."""

    assignment: tuple[str, ...]
    partitions: tuple[Mapping[str, Any], ...]
    records: tuple[PlacementRecord, ...]
    total_us: float
    transfer_us: float
    transfers: tuple[Mapping[str, Any], ...]
    single_backend_us: Mapping[str, float]
    unavailable: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The manifest record: partitions and why, every node's choice, the alternatives."""
        return {
            "total_us": round(self.total_us, 3),
            "transfer_us": round(self.transfer_us, 3),
            "single_backend_us": {k: (round(v, 3) if math.isfinite(v) else None)
                                  for k, v in self.single_backend_us.items()},
            "unavailable": dict(self.unavailable),
            "partitions": [dict(p) for p in self.partitions],
            "transfers": [dict(t) for t in self.transfers],
            "nodes": [r.to_json() for r in self.records],
        }


def transfer_s(nbytes: float, src: DeviceSpec, dst: DeviceSpec) -> float:
    """Seconds to move ``nbytes`` from ``src`` to ``dst`` (0 on the same device).

    Host<->GPU copies use the GPU's host link (PCIe); GPU<->GPU through the host pays both.
    """
    if src.name == dst.name:
        return 0.0
    t = 0.0
    for d in (src, dst):
        if d.kind != "cpu" and d.host_link_bw > 0:
            t += d.host_link_latency_s + nbytes / d.host_link_bw
    if t == 0.0:   # two host-memory devices (cpu <-> mobile simulation): a memcpy
        t = nbytes / min(src.mem_bw, dst.mem_bw)
    return t


def _ok(res: Any) -> tuple[bool, str]:
    if isinstance(res, bool):
        return res, "" if res else "not supported"
    return bool(getattr(res, "ok", res)), str(getattr(res, "reason", "") or "")


def options_from_registry(devices: Mapping[str, DeviceSpec],
                          names: Sequence[str] | None = None) -> list[BackendOption]:
    """`BackendOption`s for registered backends (``ember.backends.registry``).

    Args:
        devices: backend name -> device spec it runs on (e.g. {"cpu": cpu, "cuda": h100}).
        names: backends to consider in preference order (default: the keys of ``devices``).
    """
    from ember.backends.registry import get_backend

    out = []
    for name in names or list(devices):
        be = get_backend(name)
        avail = be.available()
        ok, why = _ok(avail)
        out.append(BackendOption(name, be.supports, devices[name], ok, why))
    return out


def choose_placement(g: Graph, options: Sequence[BackendOption] | Mapping[str, Any],
                     symbols: Mapping[str, int] | None = None, *,
                     devices: Mapping[str, DeviceSpec] | None = None,
                     inputs_on: str | None = None, outputs_on: str | None = None,
                     ) -> Placement:
    """Chooses a backend per node minimising predicted latency plus transfers.

    Args:
        g: the graph.
        options: `BackendOption`s in preference order, or a mapping backend name -> supports
            function (then ``devices`` gives each backend's device).
        symbols: concrete symbol values to evaluate costs at (``{"batch": 1, "seq": 128}``).
        devices: backend name -> device spec, when ``options`` is a mapping.
        inputs_on / outputs_on: backend whose device holds the graph inputs / must receive
            the outputs (default: the first CPU-kind option, i.e. host memory).

    Returns:
        A `Placement`; ``records`` say for every node which backend and why.
    """
    opts = _normalize(options, devices)
    unavailable = {o.name: o.reason or "unavailable" for o in opts if not o.available}
    opts = [o for o in opts if o.available]
    if not opts:
        raise ValueError(f"no available backend among {sorted(unavailable)}: {unavailable}")
    env = dict(symbols or {})
    host = next((o.name for o in opts if o.device.kind == "cpu"), opts[0].name)
    src_home = inputs_on or host
    dst_home = outputs_on or host
    by_name = {o.name: o for o in opts}
    home_dev = by_name[src_home].device if src_home in by_name else opts[0].device
    names = [o.name for o in opts]
    phys = physical_bytes(g)

    # cost[i][b]: seconds of node i on backend b (inf where unsupported)
    cost: list[dict[str, float]] = []
    why_not: list[dict[str, str]] = []
    for n in g.nodes:
        row, reasons = {}, {}
        for o in opts:
            ok, reason = _ok(o.supports(n))
            if not ok:
                row[o.name] = math.inf
                reasons[o.name] = reason or "not supported"
                continue
            est = estimate_node(n, o.device, phys)
            lat = est.latency_s
            row[o.name] = float(lat.subs({s: env[s.name] for s in lat.free_symbols})) \
                if not isinstance(lat, int | float) else float(lat)
        cost.append(row)
        why_not.append(reasons)

    # bytes of every value, evaluated
    vbytes: dict[str, float] = {}
    for name, b in phys.items():
        vbytes[name] = _eval(b, env)
    index = {v.name: i for i, n in enumerate(g.nodes) for v in n.outputs}
    graph_inputs = {v.name for v in (*g.inputs,)}

    # Viterbi over topological order: state = backend of the current node. Transfers are
    # charged per consumer edge using the producer's *chosen* backend, which a DP over one
    # predecessor cannot see for DAGs; so we do a greedy-in-order DP: each node picks the
    # backend minimising its cost + transfers from the already-placed producers, then a
    # second pass re-places nodes whose neighbours moved (fixed point, at most 3 sweeps).
    assign: list[str] = [""] * len(g.nodes)
    for _ in range(3):
        changed = False
        for i, n in enumerate(g.nodes):
            best, best_c, detail = "", math.inf, {}
            for b in names:
                c = cost[i][b]
                if not math.isfinite(c):
                    detail[b] = math.inf
                    continue
                c += _in_transfer(n, b, assign, index, vbytes, by_name, graph_inputs,
                                  src_home, home_dev)
                c += _out_transfer(g, i, b, assign, vbytes, by_name, dst_home)
                detail[b] = c
                if c < best_c - 1e-15:
                    best, best_c = b, c
            if not best:
                raise ValueError(f"no backend supports node {i} ({n.op} at {n.loc}): "
                                 + "; ".join(f"{k}: {v}" for k, v in why_not[i].items()))
            if assign[i] != best:
                assign[i], changed = best, True
        if not changed:
            break

    # records and totals
    records = []
    transfers: list[dict[str, Any]] = []
    total = xfer_total = 0.0
    for i, n in enumerate(g.nodes):
        b = assign[i]
        pred = {k: v * 1e6 for k, v in cost[i].items()}
        alts = [k for k in names if k != b and math.isfinite(cost[i][k])]
        if why_not[i] and not alts:
            reason = "only supported backend (" + "; ".join(
                f"{k}: {v}" for k, v in why_not[i].items()) + ")"
        elif alts:
            reason = (f"predicted {pred[b]:.1f} us vs " + ", ".join(
                f"{k} {pred[k]:.1f} us" for k in alts) + " (incl. transfers)"
                if len(names) > 1 else "only backend")
        else:
            reason = "only backend"
        if why_not[i] and alts:
            reason += "; unsupported on " + ", ".join(why_not[i])
        records.append(PlacementRecord(i, n.op, b, reason, pred))
        total += cost[i][b]
        for v in n.inputs:
            if v is None:
                continue
            src = assign[index[v.name]] if v.name in index else (
                src_home if v.name in graph_inputs else b)
            if src != b:
                t = transfer_s(vbytes.get(v.name, 0.0), by_name[src].device
                               if src in by_name else home_dev, by_name[b].device)
                xfer_total += t
                transfers.append({"value": v.name, "from": src, "to": b,
                                  "bytes": vbytes.get(v.name, 0.0), "us": round(t * 1e6, 3)})
    for v in g.outputs:
        if v.name in index and assign[index[v.name]] != dst_home and dst_home in by_name:
            src = assign[index[v.name]]
            t = transfer_s(vbytes.get(v.name, 0.0), by_name[src].device, by_name[dst_home].device)
            xfer_total += t
            transfers.append({"value": v.name, "from": src, "to": dst_home,
                              "bytes": vbytes.get(v.name, 0.0), "us": round(t * 1e6, 3)})

    single = {}
    for b in names:
        s = sum(c[b] for c in cost)
        single[b] = s * 1e6 + (_io_transfer_us(g, vbytes, by_name[b].device, home_dev)
                               if math.isfinite(s) else 0.0)
    parts = _partitions(g, assign, cost)
    log.info("placement: %s (%.1f us predicted, %.1f us transfers)",
             ", ".join(f"{p['backend']}[{p['start']}:{p['end']}]" for p in parts),
             (total + xfer_total) * 1e6, xfer_total * 1e6)
    return Placement(tuple(assign), tuple(parts), tuple(records), (total + xfer_total) * 1e6,
                     xfer_total * 1e6, tuple(transfers), single, unavailable)


def _normalize(options: Sequence[BackendOption] | Mapping[str, Any],
               devices: Mapping[str, DeviceSpec] | None) -> list[BackendOption]:
    if isinstance(options, Mapping):
        if devices is None:
            raise ValueError("a mapping of supports functions needs `devices`")
        return [BackendOption(k, fn, devices[k]) for k, fn in options.items()]
    return list(options)


def _eval(b: Any, env: Mapping[str, int]) -> float:
    if isinstance(b, int | float):
        return float(b)
    return float(b.subs({s: env[s.name] for s in b.free_symbols}))


def _in_transfer(n: Any, b: str, assign: Sequence[str], index: Mapping[str, int],
                 vbytes: Mapping[str, float], by_name: Mapping[str, BackendOption],
                 graph_inputs: set[str], src_home: str, home_dev: DeviceSpec) -> float:
    t = 0.0
    dst = by_name[b].device
    for v in n.inputs:
        if v is None:
            continue
        if v.name in index:
            src = assign[index[v.name]]
            if not src:
                continue
            sdev = by_name[src].device
        elif v.name in graph_inputs:
            sdev = by_name[src_home].device if src_home in by_name else home_dev
        else:
            continue   # weights are compiled into the backend's payload on its device
        t += transfer_s(vbytes.get(v.name, 0.0), sdev, dst)
    return t


def _out_transfer(g: Graph, i: int, b: str, assign: Sequence[str],
                  vbytes: Mapping[str, float], by_name: Mapping[str, BackendOption],
                  dst_home: str) -> float:
    """Transfers to consumers already placed (second sweep on) and to the graph outputs."""
    t = 0.0
    dev = by_name[b].device
    outs = {v.name for v in g.outputs}
    for v in g.nodes[i].outputs:
        if v.name in outs and dst_home in by_name:
            t += transfer_s(vbytes.get(v.name, 0.0), dev, by_name[dst_home].device)
    users = _users(g)
    for v in g.nodes[i].outputs:
        for j in users.get(v.name, ()):
            if assign[j] and assign[j] != b:
                t += transfer_s(vbytes.get(v.name, 0.0), dev, by_name[assign[j]].device)
    return t


_USERS: dict[int, tuple[Graph, dict[str, list[int]]]] = {}


def _users(g: Graph) -> dict[str, list[int]]:
    hit = _USERS.get(id(g))
    if hit is not None and hit[0] is g:
        return hit[1]
    out: dict[str, list[int]] = {}
    for j, n in enumerate(g.nodes):
        for v in n.inputs:
            if v is not None:
                out.setdefault(v.name, []).append(j)
    if len(_USERS) > 64:
        _USERS.clear()
    _USERS[id(g)] = (g, out)
    return out


def _io_transfer_us(g: Graph, vbytes: Mapping[str, float], dev: DeviceSpec,
                    home: DeviceSpec) -> float:
    b_in = sum(vbytes.get(v.name, 0.0) for v in g.inputs)
    b_out = sum(vbytes.get(v.name, 0.0) for v in g.outputs)
    return (transfer_s(b_in, home, dev) + transfer_s(b_out, dev, home)) * 1e6


def _partitions(g: Graph, assign: Sequence[str], cost: Sequence[Mapping[str, float]],
                ) -> list[dict[str, Any]]:
    """Maximal runs of consecutive nodes (topological order) on one backend."""
    parts: list[dict[str, Any]] = []
    for i, b in enumerate(assign):
        if parts and parts[-1]["backend"] == b:
            parts[-1]["end"] = i + 1
            parts[-1]["predicted_us"] += cost[i][b] * 1e6
            parts[-1]["ops"][g.nodes[i].op] = parts[-1]["ops"].get(g.nodes[i].op, 0) + 1
        else:
            parts.append({"backend": b, "start": i, "end": i + 1,
                          "predicted_us": cost[i][b] * 1e6, "ops": {g.nodes[i].op: 1}})
    for p in parts:
        p["predicted_us"] = round(p["predicted_us"], 3)
        p["nodes"] = p["end"] - p["start"]
    return parts


def flops_of(g: Graph, env: Mapping[str, int]) -> float:
    """Total FLOPs of ``g`` at ``env`` (a helper for reports)."""
    return sum(_eval(node_cost(n).flops, env) for n in g.nodes)
