"""`ember.bench`: every contender timed in its own process, outputs checked against eager."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ember
from ember.bench import bench_model_file, bench_module, format_results

from .models import small_net

pytest.importorskip("onnxruntime")


def test_bench_module_times_each_contender_in_its_own_process() -> None:
    model, x = small_net()
    cm = ember.compile(model, x, target="cpu")
    res = bench_module("net", model, x, repeats=3, warmup=1, threads=1,
                       contenders=("eager", "onnxruntime", "ember"), ember_model=cm)
    assert list(res.timings) == ["eager", "onnxruntime", "ember"]
    for t in res.timings.values():
        assert t.ms is not None and t.ms > 0, t
        assert t.max_rel_err is not None and t.max_rel_err < 1e-4, t
    table = format_results([res])
    assert "| net |" in table and "geomean" in table


def test_bench_reports_a_contender_that_cannot_be_built() -> None:
    model, x = small_net()
    res = bench_module("net", model, x, repeats=2, warmup=1, threads=1,
                       contenders=("eager", "ember"))  # no Ember model given
    assert res.timings["eager"].ms is not None
    assert res.timings["ember"].ms is None and "no Ember model" in res.timings["ember"].error


def test_bench_onnx_file_against_onnxruntime(tmp_path: Path) -> None:
    model, x = small_net()
    path = tmp_path / "net.onnx"
    torch.onnx.export(model, x, str(path), dynamo=False, opset_version=17)
    out = bench_model_file(str(path), repeats=3, threads=1)
    assert "| net.onnx |" in out
    err = float(out.rsplit("vs ORT: ", 1)[1])
    assert err < 1e-4
