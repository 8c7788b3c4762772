"""The compiled mobile program: an aarch64 library + weights, run here under qemu.

Payload files (``save``): ``model.so`` (the Relax VM executable and its kernels, aarch64),
``weights.params`` (TVM's param-dict format, tensors ``p0000``... in ``main``'s argument order,
already transformed: transposed linear weights etc.), ``runner.cc`` (the C++ example that loads
and calls them with the TVM runtime; also what runs them here).

Calling the program on this x86 machine runs the aarch64 runner under ``qemu-aarch64`` with the
aarch64 TVM runtime: slow (emulation) but bit-for-bit the code a phone would run.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ember.errors import ArtifactError, CompilerError
from ember.ir import TensorType, to_torch_dtype

from .build import load_tensors, save_tensors
from .toolchain import RUNNER_SOURCE, find_toolchain, runner_binary

__all__ = ["MobileProgram", "LIBRARY", "WEIGHTS", "RUNNER", "PAYLOAD_FILES", "run_under_qemu"]

log = logging.getLogger(__name__)

LIBRARY = "model.so"
WEIGHTS = "weights.params"
RUNNER = "runner.cc"
PAYLOAD_FILES = (LIBRARY, WEIGHTS, RUNNER)
QEMU_TIMEOUT_S = 1800


def _threads() -> int:
    return int(os.environ.get("EMBER_MOBILE_THREADS", "2"))


def run_under_qemu(library: Path, weights: Path, inputs: Path, outputs: Path, *,
                   repeat: int = 0, threads: int | None = None,
                   plugin: Path | None = None, plugin_log: Path | None = None) -> str:
    """Runs the aarch64 runner on ``library`` under qemu; returns its stderr."""
    tc = find_toolchain()
    tc.require(run=True)
    runner = runner_binary(tc)
    # -cpu max: every extension a phone may have (dotprod for the int8 sdot kernels)
    cmd = [tc.qemu or "qemu-aarch64", "-cpu", "max"]
    if plugin is not None:
        cmd += ["-plugin", str(plugin), "-d", "plugin", "-D", str(plugin_log)]
    cmd += [str(runner), str(library), str(weights), str(inputs), str(outputs)]
    if repeat:
        cmd += ["--repeat", str(repeat)]
    env = tc.qemu_env()
    env["TVM_NUM_THREADS"] = str(threads or _threads())
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True,
                             timeout=QEMU_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise CompilerError(f"the aarch64 program did not finish under qemu in "
                            f"{QEMU_TIMEOUT_S} s") from None
    if res.returncode != 0:
        raise CompilerError(f"the aarch64 program failed under qemu (exit {res.returncode}): "
                            f"{res.stderr.strip()[-1500:]}")
    return res.stderr


class MobileProgram:
    """``program(*tensors) -> list[Tensor]``, executed under qemu-aarch64.

    Attributes:
        directory: where the payload files are (a private temp dir after `compile`).
        info: JSON-able record: target, cpu, schedule, static input/output types, build
            times, which schedule rule each kernel got, tool versions.
    """

    def __init__(self, directory: Path, info: dict[str, Any], *, owned: bool = False) -> None:
        self.directory = Path(directory)
        self.info = info
        for f in PAYLOAD_FILES:
            if not (self.directory / f).is_file():
                raise ArtifactError(f"mobile payload file missing: {self.directory / f}")
        self._inputs = [TensorType.from_json(t) for t in info["inputs"]]
        self._outputs = [TensorType.from_json(t) for t in info["outputs"]]
        if owned:
            weakref.finalize(self, shutil.rmtree, str(self.directory), True)

    @property
    def library(self) -> Path:
        return self.directory / LIBRARY

    @property
    def weights(self) -> Path:
        return self.directory / WEIGHTS

    def _prepare(self, args: Sequence[Any]) -> dict[str, torch.Tensor]:
        if len(args) != len(self._inputs):
            raise CompilerError(f"mobile program takes {len(self._inputs)} inputs, "
                                f"got {len(args)}")
        out = {}
        for i, (a, ty) in enumerate(zip(args, self._inputs)):
            t = a if isinstance(a, torch.Tensor) else torch.as_tensor(a)
            if tuple(t.shape) != tuple(ty.shape):
                raise CompilerError(
                    f"input {i}: shape {tuple(t.shape)} differs from the compiled static shape "
                    f"{tuple(ty.shape)}; mobile artifacts are compiled for the example shapes "
                    f"(recompile with inputs of the shape you need)")
            out[f"i{i}"] = t.detach().to(to_torch_dtype(ty.dtype)).contiguous()
        return out

    def __call__(self, *args: Any) -> list[torch.Tensor]:
        ins = self._prepare(args)
        with tempfile.TemporaryDirectory(prefix="ember-mobile-run-") as tmp:
            tmp_p = Path(tmp)
            save_tensors(tmp_p / "inputs.params", ins)
            run_under_qemu(self.library, self.weights, tmp_p / "inputs.params",
                           tmp_p / "outputs.params")
            got = load_tensors(tmp_p / "outputs.params")
        outs = []
        for i, ty in enumerate(self._outputs):
            if f"o{i}" not in got:
                raise CompilerError(f"the aarch64 program returned {len(got)} outputs, "
                                    f"expected {len(self._outputs)}")
            outs.append(got[f"o{i}"].to(to_torch_dtype(ty.dtype)))
        return outs

    def save(self, directory: str | Path) -> list[str]:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for f in PAYLOAD_FILES:
            src = self.directory / f
            if src.resolve() != (d / f).resolve():
                shutil.copyfile(src, d / f)
        return list(PAYLOAD_FILES)

    def __repr__(self) -> str:
        return (f"MobileProgram(cpu={self.info.get('cpu')!r}, "
                f"schedule={self.info.get('schedule')!r})")


def new_payload_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="ember-mobile-"))
    shutil.copyfile(RUNNER_SOURCE, d / RUNNER)
    return d


def load_program(directory: str | Path, info: Mapping[str, Any]) -> MobileProgram:
    if info.get("backend") != "mobile":
        raise ArtifactError(f"{directory}: backend info is not a mobile program")
    return MobileProgram(Path(directory), dict(info))
