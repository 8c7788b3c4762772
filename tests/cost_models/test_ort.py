"""The ONNX Runtime latency model: profile-to-IR mapping, fit, JSON round trip, wiring."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from ember import cost_models as cm
from ember.cost_models import ort
from ember.cost_models.devices import DeviceSpec
from ember.cost_models.ort_fit import fit
from ember.cost_models.ort_synth import synth_models
from ember.ir import Graph, GraphBuilder, TensorType, sym


def _mlp() -> Graph:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (sym("batch"), 64)))
    w1 = b.add_param("w1", torch.randn(128, 64) * 0.05)
    b1 = b.add_param("b1", torch.zeros(128))
    w2 = b.add_param("w2", torch.randn(32, 128) * 0.05)
    h = b.op("relu", [b.op("linear", [x, w1, b1])])
    y = b.op("reshape", [b.op("linear", [h, w2]), ], {"shape": (sym("batch"), 4, 8)})
    b.set_outputs([b.op("permute", [y], {"perm": (0, 2, 1)})])
    return b.build()


def _dataset(n_graphs: int = 30) -> dict:
    """Rows shaped like `collect` output whose truth is known: 20 us per call plus each node
    at 3x its roofline when it is a GEMM, 1x otherwise."""
    rng = random.Random(0)
    rows = []
    for gi in range(n_graphs):
        for _ in range(3):
            nodes = []
            for _ in range(rng.randint(2, 12)):
                gemm = rng.random() < 0.4
                roof = rng.uniform(2e-6, 2e-4)
                f = [0.0] * len(ort.ORT_FEATURES)
                f[0] = 0.0 if gemm else 9.0
                f[2] = math.log10(roof * 1e12)
                t = roof * (3.0 if gemm else 1.0)
                nodes.append({"op": "x", "t": t, "k": 1, "roof": roof, "f": f})
            e2e = 20e-6 + sum(nd["t"] for nd in nodes)
            rows.append({"graph": f"g{gi}", "point": {}, "e2e_s": e2e, "e2e_iqr": 0.01,
                         "n_io": 2, "other_s": 0.0, "other_k": 0, "nodes": nodes})
    return {"rows": rows, "device": None, "threads": 2}


def test_fit_recovers_known_overheads_and_factors(tmp_path: Path) -> None:
    m = fit(_dataset(), tmp_path / "m.json")
    assert m.call_overhead_s + 2 * m.per_io_s == pytest.approx(20e-6, rel=0.05)
    assert m.meta["within10_graph_cv"] >= 0.9
    gemm = {k: 0.0 for k in ort.ORT_FEATURES} | {"cls": 0.0, "log_flops": 7.0}
    other = dict(gemm, cls=9.0)
    assert math.exp(m.log_factor(gemm)) == pytest.approx(3.0, rel=0.1)
    assert math.exp(m.log_factor(other)) == pytest.approx(1.0, rel=0.1)
    # the JSON round trip predicts the same, with no sklearn involved
    back = ort.load_ort_model(tmp_path / "m.json")
    assert back is not None and back.log_factor(gemm) == m.log_factor(gemm)


def test_model_json_refuses_other_versions(tmp_path: Path) -> None:
    m = fit(_dataset(8))
    d = m.to_json()
    d["version"] = ort.ORT_MODEL_VERSION + 1
    with pytest.raises(ValueError, match="version"):
        ort.OrtModel.from_json(d)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    assert ort.load_ort_model(p) is None


def test_estimate_is_call_overhead_plus_corrected_nodes(cpu: DeviceSpec) -> None:
    g = _mlp()
    m = fit(_dataset(8))
    est = ort.estimate_graph_ort(g, cpu, {"batch": 16}, model=m)
    bare = ort.estimate_graph_ort(g, cpu, {"batch": 16}, model=False)
    assert len(est.node_us) == len(g.nodes) and est.runtime == "onnxruntime"
    call_us = (m.call_overhead_s + m.per_io_s * 2) * 1e6
    assert est.total_us == pytest.approx(sum(est.node_us) + call_us)
    call0 = cpu.measured.get("ort", {}).get("call_overhead_s", 0.0)  # ORT's measured call cost
    assert bare.total_us == pytest.approx((sum(gr.analytical_s for gr in est.groups) + call0)
                                          * 1e6)
    # views are ORT kernels too: the permute copies, so it has a cost
    assert bare.node_us[-1] > 0
    # two host slowdowns (`GraphEstimate.scaled_us`): the GEMMs by one, the rest (the copy,
    # the call) by the other
    comp = sum(us for us, gr in zip(bare.node_us, bare.groups) if gr.op_class == "gemm")
    assert bare.compute_us() == pytest.approx(comp) and 0 < comp < bare.total_us
    assert bare.scaled_us(1.0, 1.0) == pytest.approx(bare.total_us)
    assert bare.scaled_us(2.0, 1.0) == pytest.approx(bare.total_us + comp)
    assert bare.scaled_us(1.0, 3.0) == pytest.approx(3 * bare.total_us - 2 * comp)
    # larger batches never predict less for a GEMM-only graph under the bare roofline
    assert ort.estimate_graph_ort(g, cpu, {"batch": 512}, model=False).total_us > bare.total_us


def test_features_see_first_use_of_symbolic_attrs(cpu: DeviceSpec) -> None:
    g = _mlp()
    roofs = [ort.node_roofline_s(n, cpu, {"batch": 2}) for n in g.nodes]
    feats = ort.node_features(g, {"batch": 2}, cpu, [r[1] for r in roofs],
                              [r[2] for r in roofs])
    ops = [n.op for n in g.nodes]
    assert feats[ops.index("reshape")]["new_syms"] == 1.0
    assert feats[ops.index("linear")]["w_param"] == 1.0
    assert feats[ops.index("relu")]["prod_cls"] == ort.CLASS_IDS["gemm"]


def test_profiles_map_every_ort_kernel_to_an_ir_node(tmp_path: Path, cpu: DeviceSpec) -> None:
    """Prepare and time two real training graphs (one transformer, one MLP) with ONNX
    Runtime: every profiled kernel lands on an IR node, and the node times add up to no more
    than the end-to-end call (which also pays the call overhead). The collector is a script
    (``examples/ort_collect.py``: it needs the driver and the CPU backend's runner)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    from ort_collect import prepare_graph, time_graph

    torch.set_num_threads(1)
    models = [sm for sm in synth_models(2, seed=3)]
    for sm in models:
        sm.points = sm.points[:1]
        assert prepare_graph(sm, tmp_path, cpu)
        side = json.loads((tmp_path / f"{sm.name}.json").read_text())
        (row,) = time_graph(side, tmp_path, repeats=3)
        assert row["other_k"] == 0
        kernels = sum(nd["k"] for nd in row["nodes"])
        assert kernels > 0 and len(row["nodes"]) == len(side["ops"])
        assert all(nd["roof"] > 0 for nd in row["nodes"])
        assert len(row["nodes"][0]["f"]) == len(ort.ORT_FEATURES)


def test_ort_program_is_predicted_with_the_ort_runtime(tmp_path: Path) -> None:
    from ember.backends.cpu.program import CpuProgram
    from ember.compiled import CompiledModel

    g = _mlp()
    info = {"kind": "onnxruntime", "chosen": "onnxruntime"}
    c = CompiledModel(g, CpuProgram("onnxruntime", lambda *a: a, g, info), target="cpu",
                      backend="cpu", pipeline="O2", records={}, placement={"program": info})
    assert c._runtime_kind() == "onnxruntime"
    x = torch.randn(8, 64)
    want = cm.predict_latency_ms(g, "cpu", [x], runtime="onnxruntime")
    assert c.predicted_latency_ms(x) == pytest.approx(want)
    # host_probe scales it by the host's speed now (probe time / the spec's), nothing else
    from ember.cost_models import devices

    calls = []
    monkey = pytest.MonkeyPatch()
    monkey.setattr(devices, "host_speed", lambda spec, threads=None, cold=False:
                   calls.append((spec, cold)) or (1.5 if cold else 1.25))
    try:
        assert c.predicted_latency_ms(x, host_probe=True) == pytest.approx(1.25 * want)
        assert calls and calls[0][0].kind == "cpu" and not calls[0][1]
        # a model whose GEMM weights exceed the L3 is scaled by the cold (DRAM) probe
        small_l3 = cm.get_device("cpu").l3_bytes
        if small_l3:
            monkey.setattr(cm.ort, "gemm_weight_bytes", lambda g: small_l3 + 1)
            big = c.predicted_latency_ms(x)  # now priced at the cold grid
            assert c.predicted_latency_ms(x, host_probe=True) == pytest.approx(1.5 * big)
            assert calls[-1][1]
        with pytest.raises(ValueError, match="host_probe"):
            c.predicted_latency_ms(x, device="h100", host_probe=True)
    finally:
        monkey.undo()
    assert cm.runtime_of_program("cpu", {"chosen": "aoti"}) == "inductor"
    assert cm.runtime_of_program("reference", {"kind": "interpreter"}) == "eager"
    # another device than the CPU predicts the fused-kernel runtime instead of failing
    assert cm.predict_latency_ms(g, "h100", [x], runtime="onnxruntime") > 0


def test_ort_kernels_are_measured_with_the_device(cpu: DeviceSpec) -> None:
    k = cpu.measured["ort"]
    assert len(k["gemm"]) >= 4 and all(r[3] > 0 for r in k["gemm"])
    for key in ("dwconv_flops", "conv_flops", "attention_flops", "call_overhead_s"):
        assert k[key] > 0, key
    assert k["node_overhead_s"] >= 0 and k["in_graph"]
    assert k["conv"] and k["dwconv"] and all(r[3] > 0 for r in k["conv"] + k["dwconv"])
    # the memory-bound table: more bytes never take less time per node (medians, so allow
    # 30% of timing noise between neighbours), and a LayerNorm costs more than an Add
    st = sorted(k["stream"])
    assert len(st) >= 3 and all(b[1] >= 0.7 * a[1] for a, b in zip(st, st[1:]))
    assert st[-1][1] > 3 * st[0][1]
    assert k["stream_factor"].get("layer_norm", 1.0) > 1.0


def test_memory_bound_time_interpolates_the_stream_table() -> None:
    table = [[1e3, 1e-6], [1e5, 1e-5], [1e7, 1e-3]]
    assert ort.stream_s(table, 10) == pytest.approx(1e-6)       # dispatch-bound floor
    assert ort.stream_s(table, 1e5) == pytest.approx(1e-5)
    assert 1e-6 < ort.stream_s(table, 1e4) < 1e-5               # log-log between rows
    assert ort.stream_s(table, 1e4) == pytest.approx(10 ** -5.5)
    assert ort.stream_s(table, 2e7) == pytest.approx(2e-3)      # past the end: its bandwidth


def test_memory_bound_nodes_use_the_table_and_their_factor(cpu: DeviceSpec) -> None:
    from dataclasses import replace

    from ember.cost_models.analytical import op_class

    g = _mlp()
    ew = next(n for n in g.nodes if op_class(n) in ("elementwise", "norm"))
    table = [[1.0, 5e-6], [1e12, 5e-6]]     # 5 us per node whatever the size
    fake = {**cpu.measured["ort"], "stream": table, "stream_factor": {ew.op: 3.0}}
    dev = replace(cpu, measured={**cpu.measured, "ort": fake})
    t, _, _ = ort.node_roofline_s(ew, dev, {"batch": 4})
    assert t == pytest.approx(15e-6)
    # a reshape copies nothing: its dispatch plus one node for its symbolic target dim
    rs = next(n for n in g.nodes if n.op == "reshape")
    assert ort.node_roofline_s(rs, dev, {"batch": 4})[0] == pytest.approx(10e-6)


def test_gemm_throughput_interpolates_the_measured_grid() -> None:
    grid = [[m, k, n, 1e9 * m] for m in (16, 256) for k, n in ((64, 64), (768, 768))]
    assert ort.gemm_flops_per_s(grid, 16, 64, 64) == pytest.approx(16e9)
    mid = ort.gemm_flops_per_s(grid, 64, 768, 768)
    assert 16e9 < mid < 256e9
    # outside the grid: clamped to its edge, never extrapolated
    assert ort.gemm_flops_per_s(grid, 1, 768, 768) == pytest.approx(16e9)
    assert ort.gemm_flops_per_s(grid, 10**6, 768, 768) == pytest.approx(256e9)


def test_roofline_divides_gemms_by_the_throughput_ort_reached(cpu: DeviceSpec) -> None:
    from dataclasses import replace

    g = _mlp()
    lin = next(n for n in g.nodes if n.op in ("linear", "fused_linear"))
    slow = {**cpu.measured["ort"], "gemm": [[m, 64, 128, 1e8] for m in (16, 4096)],
            "node_overhead_s": 0.0}
    dev = replace(cpu, measured={**cpu.measured, "ort": slow}, mem_bw=1e15)
    t, flops, _ = ort.node_roofline_s(lin, dev, {"batch": 512})
    assert t == pytest.approx(flops / 1e8)
    # kernels timed inside graphs include their dispatch: no per-node overhead on top
    inside = {**slow, "node_overhead_s": 1.0, "in_graph": True}
    dev2 = replace(dev, measured={**cpu.measured, "ort": inside})
    assert ort.node_roofline_s(lin, dev2, {"batch": 512})[0] == pytest.approx(flops / 1e8)


def test_weights_bigger_than_the_l3_read_the_cold_gemm_grid(cpu: DeviceSpec) -> None:
    """GEMM weights that together exceed the L3 come from DRAM on every call (each block's
    weights were evicted by the rest of the model since the previous call): their GEMMs are
    divided by the grid timed with such weights (``gemm_cold``) up to that grid's largest M;
    weights that fit together keep the cached grid, and so do larger M."""
    from dataclasses import replace

    g = _mlp()
    hot = [[m, 64, 128, 4e9] for m in (16, 4096)]
    cold = [[m, 64, 128, 1e9] for m in (16, 256)]
    fake = {**cpu.measured["ort"], "gemm": hot, "gemm_cold": cold, "node_overhead_s": 0.0}
    base = replace(cpu, measured={**cpu.measured, "ort": fake}, mem_bw=1e15)
    lin = [n for n in g.nodes if n.op in ("linear", "fused_linear")]

    def gemm_s(l3: int, batch: int) -> float:
        est = ort.estimate_graph_ort(g, replace(base, l3_bytes=l3), {"batch": batch},
                                     model=False)
        return sum(est.node_us[g.nodes.index(n)] for n in lin) * 1e-6

    flops = sum(ort.node_roofline_s(n, base, {"batch": 64})[1] for n in lin)
    assert min(t.numel() * 4 for t in g.weights.values() if t.dim() == 2) > 1000
    assert gemm_s(1000, 64) == pytest.approx(flops / 1e9, rel=1e-6)          # cold
    assert gemm_s(10**9, 64) == pytest.approx(flops / 4e9, rel=1e-6)         # fits: cached
    # every weight fits alone but not all of them together: all cold
    sizes = [g.weights[n.inputs[1].name].numel() * 4 for n in lin]
    assert len(sizes) > 1 and max(sizes) < sum(sizes)
    assert gemm_s(max(sizes), 64) == pytest.approx(flops / 1e9, rel=1e-6)
    assert gemm_s(sum(sizes), 64) == pytest.approx(flops / 4e9, rel=1e-6)     # exactly fits
    big = sum(ort.node_roofline_s(n, base, {"batch": 1024})[1] for n in lin)
    assert gemm_s(1000, 1024) == pytest.approx(big / 4e9, rel=1e-6)          # past the grid
    # the measured spec has the cold grid where the L3 can be exceeded by a chain
    if cpu.l3_bytes:
        rows = cpu.measured["ort"].get("gemm_cold") or []
        assert rows and all(r[3] > 0 for r in rows)


def test_int4_linears_use_the_matmulnbits_grid_of_their_accuracy_level(cpu: DeviceSpec) -> None:
    """Weight-only int4 and W4A8 run different ORT kernels (MatMulNBits at accuracy level 0 /
    4): each is divided by its own measured grid, not by the fp32 GEMM's."""
    from dataclasses import replace

    from ember.ir.opset_quant import quantize_weight_groups

    assert set(cpu.measured["ort"]["nbits"]) == {"0", "4"}
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (sym("m"), 128)))
    q, s = quantize_weight_groups(torch.randn(64, 128), 4, 32)
    outs = [b.op("linear_woq", [x, b.add_param(f"q{i}", q), b.add_param(f"s{i}", s)],
                 {"bits": 4, "group_size": 32, **({"act_quant": "block"} if i else {})})
            for i in range(2)]
    b.set_outputs(outs)
    g = b.build()
    grids = {"0": [[m, 128, 64, 1e8] for m in (1, 256)],
             "4": [[m, 128, 64, 4e8] for m in (1, 256)]}
    dev = replace(cpu, measured={**cpu.measured, "ort": {**cpu.measured["ort"], "nbits": grids}})
    (t0, f0, _), (t4, f4, _) = (ort.node_roofline_s(n, dev, {"m": 1}) for n in g.nodes)
    assert t0 == pytest.approx(f0 / 1e8) and t4 == pytest.approx(f4 / 4e8)
