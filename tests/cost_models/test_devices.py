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
    again = get_device("cpu", cache_dir=cache_dir, threads=1)
    assert again == DeviceSpec.from_json(doc)
    assert again.peak_flops == cpu.peak_flops


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
