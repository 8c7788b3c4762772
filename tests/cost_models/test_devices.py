"""Device specs: the measured CPU is cached and reused; published specs are consistent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
