"""The ember CLI end to end: compile a .pt2, run, inspect; one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from .models import small_net


def ember_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "ember", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def pt2(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    d = tmp_path_factory.mktemp("cli")
    model, x = small_net()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, x, dynamic_shapes={"x": {0: batch}})
    torch.export.save(ep, d / "net.pt2")
    return d, model


def test_compile_run_inspect(pt2):
    d, model = pt2
    r = ember_cli("compile", "net.pt2", "-o", "net.ember", "--target", "cpu", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "wrote net.ember" in r.stdout
    assert "[ember" in r.stderr  # progress lines
    x = np.random.default_rng(0).standard_normal((3, 3, 12, 12)).astype(np.float32)
    np.save(d / "x.npy", x)
    r = ember_cli("run", "net.ember", "--input", "x.npy", "--output", "y.npy", cwd=d)
    assert r.returncode == 0, r.stderr
    y = np.load(d / "y.npy")
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(y - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    r = ember_cli("inspect", "net.ember", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "backend:" in r.stdout and "IR:" in r.stdout and "passes:" in r.stdout


def test_errors_are_one_line(pt2):
    d, _ = pt2
    r = ember_cli("compile", "missing.pt2", cwd=d)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "missing.pt2" in r.stderr
    (d / "junk.ember").write_bytes(b"not a zip")
    r = ember_cli("run", "junk.ember", "--input", "x.npy", cwd=d)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "junk.ember" in r.stderr
    (d / "junk.pt2").write_bytes(b"garbage")
    r = ember_cli("compile", "junk.pt2", cwd=d)
    assert r.returncode == 1 and "Traceback" not in r.stderr


@pytest.mark.slow
def test_compile_and_run_a_packaged_onnx_model(tmp_path: Path):
    """`ember compile model.onnx --input-shape ...` on a paddle2onnx file; output matches ORT."""
    import importlib.util

    ort = pytest.importorskip("onnxruntime")
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None:
        pytest.skip("rapidocr-onnxruntime is not installed (make venv installs it)")
    model = Path(spec.submodule_search_locations[0]) / "models" / \
        "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    r = ember_cli("compile", str(model), "-o", "cls.ember", "--input-shape",
                  "x=batch,3,48,192", "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    x = np.random.default_rng(0).random((2, 3, 48, 192), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    r = ember_cli("run", "cls.ember", "--input", "x.npy", "--output", "y.npy", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    assert np.abs(np.load(tmp_path / "y.npy") - want).max() <= 1e-4
    r = ember_cli("compile", str(model), "--input-shape", "x:bad", cwd=tmp_path)
    assert r.returncode == 1 and "--input-shape" in r.stderr


def test_compile_for_cuda_without_a_gpu(tmp_path: Path):
    """`ember compile --target cuda` writes the artifact (AOT cubins) on a CPU-only machine, says
    that it could not check fidelity here, and `run` refuses in one line; inspect shows the plan."""
    if torch.cuda.is_available():
        pytest.skip("this checks the no-GPU messages")
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 8)).eval()
    torch.onnx.export(model, (torch.randn(4, 32),), str(tmp_path / "mlp.onnx"), dynamo=False,
                      input_names=["x"])
    r = ember_cli("compile", "mlp.onnx", "--target", "cuda", "-o", "m.ember", "--passes",
                  "O2,quantize{scheme=w8a8-dynamic,gate=always}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "backend=cuda" in r.stdout and "fidelity not checked: cannot run here" in r.stdout
    np.save(tmp_path / "x.npy", np.zeros((4, 32), np.float32))
    r = ember_cli("run", "m.ember", "--input", "x.npy", cwd=tmp_path)
    assert r.returncode == 1 and "cannot run here" in r.stderr
    assert r.stderr.strip().count("\n") == 0
    r = ember_cli("inspect", "m.ember", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "kernel plan" in r.stdout and "qlinear_dynamic -> kernel" in r.stdout
