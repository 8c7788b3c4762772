"""ember.compile / CompiledModel / artifact round trip through the Python API."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import ember
from ember.errors import ArtifactError, CompilerError

from .models import TwoOut, small_net


@pytest.fixture(scope="module")
def compiled_cpu():
    model, x = small_net()
    cm = ember.compile(model, x, target="cpu", dynamic_dims={"x": {0: "batch"}})
    return model, x, cm


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = max(1.0, float(b.abs().max()))
    assert float((a - b).abs().max()) <= 1e-4 * scale


def test_compile_matches_eager_and_dynamic_batch(compiled_cpu):
    model, x, cm = compiled_cpu
    for batch in (2, 5):
        xb = torch.randn(batch, 3, 12, 12)
        with torch.no_grad():
            _close(cm(xb), model(xb))
    assert cm.fidelity["example_max_rel_error"] <= 1e-4
    assert cm.graph.inputs[0].type.shape[0].name == "batch"


def test_numpy_in_numpy_out(compiled_cpu):
    model, x, cm = compiled_cpu
    out = cm(x[0].numpy())
    assert isinstance(out, np.ndarray)
    with torch.no_grad():
        _close(torch.from_numpy(out), model(*x))


def test_artifact_round_trip_no_pickle(compiled_cpu, tmp_path: Path):
    model, x, cm = compiled_cpu
    path = cm.save(tmp_path / "m.ember")
    loaded = ember.load(path)
    xb = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        _close(loaded(xb), model(xb))
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        assert {"manifest.json", "ir.json", "weights.safetensors"} <= set(names)
        man = json.loads(z.read("manifest.json"))
        for n in names:
            data = z.read(n)
            assert not n.endswith((".pkl", ".pickle", ".pt", ".pth")), n
            # pickle protocol 2+ streams start with 0x80 <proto>
            assert not (len(data) > 1 and data[0] == 0x80 and data[1] in (2, 3, 4, 5)), n
    assert man["inputs"][0]["shape"][0] == "batch"
    assert set(man["files"]) == set(names) - {"manifest.json"}
    assert man["tool_versions"]["torch"].startswith("2.13")
    assert man["backend"] in ("cpu", "reference")


def _rewrite_zip(src: Path, dst: Path, edit) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for n in zin.namelist():
            zout.writestr(n, edit(n, zin.read(n)))


def test_tampered_truncated_wrong_version_refused(compiled_cpu, tmp_path: Path):
    _, _, cm = compiled_cpu
    good = cm.save(tmp_path / "good.ember")

    bad = tmp_path / "tampered.ember"
    _rewrite_zip(good, bad, lambda n, d: (d[:-1] + bytes([d[-1] ^ 1]))
                 if n == "weights.safetensors" else d)
    with pytest.raises(ArtifactError, match=r"tampered\.ember: weights\.safetensors fails"):
        ember.load(bad)

    trunc = tmp_path / "trunc.ember"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="trunc.ember"):
        ember.load(trunc)

    def bump(n: str, d: bytes) -> bytes:
        if n != "manifest.json":
            return d
        m = json.loads(d)
        m["format_version"] = 99
        return json.dumps(m).encode()

    wrong = tmp_path / "wrong.ember"
    _rewrite_zip(good, wrong, bump)
    with pytest.raises(ArtifactError, match="format version 99"):
        ember.load(wrong)
    with pytest.raises(ArtifactError, match="no such artifact"):
        ember.load(tmp_path / "missing.ember")
    for err in (ArtifactError,):
        try:
            ember.load(bad)
        except err as e:
            assert "\n" not in str(e)


def test_multiple_outputs_and_reference_target():
    torch.manual_seed(0)
    m = TwoOut().eval()
    x = torch.randn(4, 16)
    cm = ember.compile(m, (x,), target="reference")
    a, b = cm(x)
    with torch.no_grad():
        ea, eb = m(x)
    _close(a, ea)
    _close(b, eb)


def test_bad_calls_give_clear_errors(compiled_cpu):
    _, x, cm = compiled_cpu
    with pytest.raises(CompilerError, match="takes 1 inputs"):
        cm(x[0], x[0])
    # a size the program was not built for: named by input and dim, not ORT's own message
    k = x[0].shape[-1]
    bad = torch.randn(*x[0].shape[:-1], k + 1)
    with pytest.raises(CompilerError, match=rf"input '\w+' dim {x[0].dim() - 1}: "
                                            rf"expected {k}, got {k + 1}"):
        cm(bad)
    with pytest.raises(CompilerError, match="unknown target"):
        ember.compile(TwoOut(), (torch.randn(1, 16),), target="tpu")
    with pytest.raises(CompilerError, match="unknown pass"):
        ember.compile(TwoOut(), (torch.randn(1, 16),), passes="O1,no_such_pass")


def test_onnxruntime_artifact_stores_weights_once(tmp_path: Path):
    """An artifact shipping ONNX Runtime keeps its params only in weights.safetensors: model.onnx
    refers to them and the loader hands them to ORT; the loaded model still matches eager."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(),
                                torch.nn.Linear(256, 64), torch.nn.LayerNorm(64)).eval()
    x = torch.randn(4, 64)
    cm = ember.compile(model, (x,), target="cpu", dynamic_dims={"input": {0: "batch"}},
                       backend_options={"mode": "onnxruntime"})
    assert cm.program.kind == "onnxruntime"
    path = cm.save(tmp_path / "m.ember")
    with zipfile.ZipFile(path) as z:
        sizes = {i.filename: i.file_size for i in z.infolist()}
    param_bytes = cm.graph.param_bytes()
    assert sizes["weights.safetensors"] >= param_bytes
    assert sizes["payload/model.onnx"] < param_bytes / 10, sizes
    loaded = ember.load(path)
    assert loaded.program.kind == "onnxruntime"
    for batch in (1, 7):
        xb = torch.randn(batch, 64)
        with torch.no_grad():
            _close(loaded(xb), model(xb))
