"""Device specs: the measured CPU is cached and reused; published specs are consistent."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ember.cost_models import devices
from ember.cost_models.devices import DeviceSpec, cpu_cache_path, get_device


def test_measured_cpu_is_sane(cpu: DeviceSpec) -> None:
    assert cpu.kind == "cpu" and cpu.source == "measured"
    for dt in ("float32", "bfloat16", "float16", "int8"):
        assert cpu.peak(dt) > 0
    assert cpu.mem_bw > 0 and cpu.launch_overhead_s > 0
    assert cpu.measured["threads"] >= 1


def test_cpu_spec_is_cached(cpu: DeviceSpec, cache_dir: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = cpu_cache_path(cache_dir, threads=1)
    assert path.is_file()
    doc = json.loads(path.read_text())
    assert doc["version"] == devices.SPEC_VERSION and doc["name"] == "cpu"
    # a fresh process (memo cleared) must read the cache, never re-measure
    monkeypatch.setattr(devices, "_MEMO", {})

    def boom(*a: object, **k: object) -> DeviceSpec:
        raise AssertionError("re-measured despite a cached spec")
    monkeypatch.setattr(devices, "measure_cpu", boom)
    monkeypatch.setattr(devices.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    if devices._taken_under_load(DeviceSpec.from_json(doc)):  # the suite itself loaded it
        doc["measured"]["loadavg_1m"] = 0.0
        path.write_text(json.dumps(doc))
    again = get_device("cpu", cache_dir=cache_dir, threads=1)
    assert again == DeviceSpec.from_json(doc)
    assert again.peak_flops == cpu.peak_flops


def test_spec_measured_under_load_is_measured_again(cpu: DeviceSpec, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    doc = cpu.to_json()
    doc["measured"] = {**doc["measured"], "loadavg_1m": 13.6}
    doc["cores"] = 2
    path = cpu_cache_path(tmp_path, threads=1)
    path.write_text(json.dumps(doc))
    monkeypatch.setattr(devices, "_MEMO", {})
    fresh = DeviceSpec.from_json({**doc, "measured": {**doc["measured"], "loadavg_1m": 0.3}})
    monkeypatch.setattr(devices, "measure_cpu", lambda *a, **k: fresh)
    monkeypatch.setattr(devices.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    assert get_device("cpu", cache_dir=tmp_path, threads=1).measured["loadavg_1m"] == 13.6
    monkeypatch.setattr(devices, "_MEMO", {})
    monkeypatch.setattr(devices.os, "getloadavg", lambda: (0.5, 0.5, 0.5))  # now idle
    assert get_device("cpu", cache_dir=tmp_path, threads=1) == fresh
    assert json.loads(path.read_text())["measured"]["loadavg_1m"] == 0.3  # cache replaced


def test_cache_key_depends_on_threads(cache_dir: Path) -> None:
    assert cpu_cache_path(cache_dir, threads=1) != cpu_cache_path(cache_dir, threads=2)


def test_published_devices() -> None:
    h100, a100, phone = get_device("h100"), get_device("a100"), get_device("phone")
    assert get_device("cuda") is h100 and get_device("mobile") is phone
    assert h100.peak("bfloat16") > a100.peak("bfloat16") > phone.peak("bfloat16")
    assert h100.mem_bw > a100.mem_bw > phone.mem_bw
    for d in (h100, a100, phone):
        assert d.peak("int8") >= d.peak("float16") >= d.peak("float32")
        assert DeviceSpec.from_json(json.loads(json.dumps(d.to_json()))) == d
    with pytest.raises(KeyError):
        get_device("tpu")


def test_grid_session_takes_any_row_count() -> None:
    """The GEMM grid times every M on one session whose rows are a symbolic dim."""
    import numpy as np
    from onnx import helper

    from ember.backends.cpu.onnx.session import graph_session

    w = np.eye(8, dtype=np.float32)
    sess = graph_session([helper.make_node("MatMul", ["x", "w"], ["y"])],
                         {"x": np.ones((4, 8), np.float32)}, 1, {"w": w}, dynamic_rows=True)
    assert sess.get_inputs()[0].shape[0] == "rows"
    for m in (1, 16, 64):
        x = np.arange(m * 8, dtype=np.float32).reshape(m, 8)
        np.testing.assert_allclose(sess.run(None, {"x": x})[0], x)


def test_quick_spec_has_every_grid_point(cpu: DeviceSpec) -> None:
    ort = cpu.measured.get("ort")
    if not ort:
        pytest.skip("onnxruntime not installed")
    ms = {r[0] for r in ort["gemm"]}
    kns = {(r[1], r[2]) for r in ort["gemm"]}
    assert ms == set(devices._ORT_GEMM_M_QUICK) and kns == set(devices._ORT_GEMM_KN_QUICK)
    assert all(r[3] > 0 for r in ort["gemm"] + ort["conv"] + ort["dwconv"])
    assert len(ort["conv"]) == len(devices._ORT_CONV_QUICK)
    # rates are per conv, not per chain: no kernel beats the best GEMM the spec measured
    best = max(r[3] for r in ort["gemm"])
    assert all(r[3] < 1.5 * best for r in ort["conv"] + ort["dwconv"])
    assert [r[:3] for r in ort["conv"]] == [[b * hw * hw, cin * k * k, cout] for cin, cout, hw,
                                           k, b in devices._ORT_CONV_QUICK]


def test_conv_chain_is_a_model_like_conv_graph() -> None:
    """The conv grid's chain: alternating cin -> cout -> cin convs with their own weights and
    biases (depthwise: the channels kept), shapes that run in ONNX Runtime."""
    from ember.backends.cpu.onnx.session import graph_session

    rng = np.random.default_rng(0)

    def rnd(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    for cin, cout, k, groups in ((8, 16, 3, 1), (8, 8, 3, 8), (4, 12, 1, 1)):
        nodes, inits = devices._conv_chain(cin, cout, k, groups, rnd)
        assert len(nodes) == devices._CONV_CHAIN and len(inits) == 2 * devices._CONV_CHAIN
        assert len({id(v) for v in inits.values()}) == len(inits)
        x = rnd(2, cin, 6, 6)
        y = graph_session(nodes, {"x": x}, 1, inits).run(None, {"x": x})[0]
        assert y.shape == (2, cin if devices._CONV_CHAIN % 2 == 0 else cout, 6, 6)
        ref = torch.from_numpy(x)
        for i in range(devices._CONV_CHAIN):
            ref = torch.nn.functional.conv2d(ref, torch.from_numpy(inits[f"w{i}"]),
                                             torch.from_numpy(inits[f"b{i}"]), padding=k // 2,
                                             groups=groups)
        # four random convs grow values to ~1e4: the tolerance scales with them
        np.testing.assert_allclose(y, ref.numpy(), rtol=1e-4,
                                   atol=1e-5 * float(ref.abs().max()))


def test_host_speed_probe(cpu: DeviceSpec) -> None:
    """The probe re-times one of the spec's own GEMM grid jobs: the spec's rate implies its
    time, and the probe timed now (alone, or in `ember.isolated` rounds) is that time within
    what a shared host's drift allows (no absolute time asserted)."""
    if not cpu.measured.get("ort"):
        pytest.skip("onnxruntime not installed")
    m, k, n, rate = devices.probe_point(cpu)
    assert [m, k, n, rate] in [list(map(float, r)) for r in cpu.measured["ort"]["gemm"]]
    want = devices.probe_expected_s(cpu)
    assert want > 4 * 2.0 * m * k * n / rate
    slow = devices.host_speed(cpu, threads=1)
    assert slow is not None and 0.2 < slow < 20
    from ember.isolated import Contender, time_isolated

    res = time_isolated({"probe": Contender("ember.cost_models.devices:probe_runner",
                                            (m, k, n, 1, 5))}, [], repeats=3, threads=1)
    assert res["probe"].ms and 0.2 < res["probe"].ms / 5 / 1e3 / want < 20
    assert devices.probe_point(devices.get_device("h100")) is None
    # the cold probe: a cold-grid point, timed in a chain as long as the spec's (weights
    # twice the L3), so its time now over the spec's is the host's DRAM-bound slowdown
    if cpu.l3_bytes and cpu.measured["ort"].get("gemm_cold"):
        m, k, n, rate = devices.probe_point(cpu, cold=True)
        assert [m, k, n, rate] in [list(map(float, r)) for r in cpu.measured["ort"]["gemm_cold"]]
        gemms = devices.probe_gemms(cpu, cold=True)
        assert gemms * 4 * k * n >= 1.5 * cpu.l3_bytes
        want = devices.probe_expected_s(cpu, cold=True)
        assert want > gemms * 2.0 * m * k * n / rate
        slow = devices.host_speed(cpu, threads=1, cold=True)
        assert slow is not None and 0.2 < slow < 20
    assert devices.probe_point(replace(cpu, l3_bytes=0), cold=True) is None
    # the stream probe: a chain of Adds at one row of the spec's memory-bound table
    numel, want = devices.stream_probe(cpu)
    row = [r for r in cpu.measured["ort"]["stream"] if int(r[0]) == 8 * numel]
    assert row and want > devices._STREAM_CHAIN * row[0][1]
    slow = devices.host_speed(cpu, threads=1, stream=True)
    assert slow is not None and 0.2 < slow < 20
    assert devices.stream_probe(devices.get_device("h100")) is None
