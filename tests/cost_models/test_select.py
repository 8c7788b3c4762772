"""Placement: the cheaper backend wins, transfers are paid, support is respected."""

from __future__ import annotations

import torch

from ember.backends.base import Support
from ember.cost_models.devices import H100_SXM, PHONE_X3, DeviceSpec
from ember.cost_models.select import BackendOption, choose_placement, transfer_s
from ember.ir import Graph, GraphBuilder, TensorType


def _mlp(batch: int, din: int = 2048, hidden: int = 8192) -> Graph:
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (batch, din)))
    w1 = b.add_param("w1", torch.zeros(hidden, din))
    w2 = b.add_param("w2", torch.zeros(din, hidden))
    h = b.op("relu", [b.op("linear", [x, w1])])
    b.set_outputs([b.op("linear", [h, w2])])
    return b.build()


def _all(node: object) -> Support:
    return Support(True)


def test_picks_much_faster_backend(cpu: DeviceSpec) -> None:
    g = _mlp(batch=512)
    p = choose_placement(g, {"cpu": _all, "cuda": _all}, devices={"cpu": cpu, "cuda": H100_SXM})
    assert set(p.assignment) == {"cuda"}
    assert p.transfer_us > 0   # the input goes over PCIe and the output comes back
    assert p.total_us < p.single_backend_us["cpu"]
    doc = p.to_json()
    assert doc["partitions"][0]["backend"] == "cuda"
    assert all("predicted" in n["reason"] for n in doc["nodes"])


def test_transfer_cost_keeps_tiny_work_on_host(cpu: DeviceSpec) -> None:
    # a tiny elementwise op on a big input: computing on the GPU is faster, but moving the
    # input over PCIe and back costs more than doing it on the CPU
    b = GraphBuilder()
    x = b.add_input("x", TensorType("float32", (4096, 4096)))
    b.set_outputs([b.op("relu", [x])])
    g = b.build()
    slow_cpu = DeviceSpec(name="slowcpu", kind="cpu", peak_flops={"float32": 100e9},
                          mem_bw=200e9, launch_overhead_s=5e-6, cores=2)
    p = choose_placement(g, {"cpu": _all, "cuda": _all},
                         devices={"cpu": slow_cpu, "cuda": H100_SXM})
    assert p.assignment == ("cpu",)
    rec = p.records[0]
    assert rec.predicted_us["cuda"] < rec.predicted_us["cpu"]   # compute alone favours cuda
    nbytes = 4096 * 4096 * 4
    assert transfer_s(nbytes, slow_cpu, H100_SXM) > nbytes / slow_cpu.mem_bw


def test_unsupported_node_falls_back_with_reason(cpu: DeviceSpec) -> None:
    g = _mlp(batch=256)

    def no_relu(node: object) -> Support:
        return Support(node.op != "relu", "relu not implemented")   # type: ignore[attr-defined]

    opts = [BackendOption("cuda", no_relu, H100_SXM), BackendOption("cpu", _all, cpu)]
    p = choose_placement(g, opts)
    relu = [r for r in p.records if r.op == "relu"][0]
    assert relu.backend == "cpu" and "relu not implemented" in relu.reason
    assert len(p.partitions) >= 2


def test_unavailable_backend_is_recorded(cpu: DeviceSpec) -> None:
    g = _mlp(batch=2, din=64, hidden=64)
    opts = [BackendOption("mobile", _all, PHONE_X3, available=False, reason="no TVM"),
            BackendOption("cpu", _all, cpu)]
    p = choose_placement(g, opts)
    assert set(p.assignment) == {"cpu"} and p.unavailable == {"mobile": "no TVM"}


def test_registry_backends(cpu: DeviceSpec) -> None:
    from ember.cost_models.select import options_from_registry

    opts = options_from_registry({"cpu": cpu, "reference": cpu})
    p = choose_placement(_mlp(batch=2, din=32, hidden=32), opts)
    assert set(p.assignment) <= {"cpu", "reference"}
