"""The tools the mobile backend needs, where they are, and what is missing.

x86 side: TVM (``apache-tvm`` + ``apache-tvm-ffi``, pinned) to compile, Debian's
``aarch64-linux-gnu-g++`` to link, ``aarch64-linux-gnu-objdump`` to inspect. aarch64 side: the
TVM runtime libraries and tvm-ffi headers unpacked from the aarch64 wheels (into
``$VENV/share/ember/tvm-aarch64`` by ``setup_toolchain.sh``; ``EMBER_TVM_AARCH64`` overrides),
and ``qemu-aarch64`` to run the result on this machine.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from ember.errors import BackendUnavailableError

__all__ = [
    "TVM_VERSION",
    "TVM_FFI_VERSION",
    "SETUP_SCRIPT",
    "RUNNER_SOURCE",
    "Toolchain",
    "find_toolchain",
    "runtime_dir",
]

log = logging.getLogger(__name__)

TVM_VERSION = "0.27.0.post1"
TVM_FFI_VERSION = "0.1.14.post1"
HERE = Path(__file__).resolve().parent
SETUP_SCRIPT = HERE / "setup_toolchain.sh"
RUNNER_SOURCE = HERE / "runner.cc"
CROSS_CXX = "aarch64-linux-gnu-g++"
OBJDUMP = "aarch64-linux-gnu-objdump"
QEMU = "qemu-aarch64"
SYSROOT = Path("/usr/aarch64-linux-gnu")
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")


def runtime_dir() -> Path:
    """Where the aarch64 TVM runtime (lib/, include/) lives."""
    env = os.environ.get("EMBER_TVM_AARCH64")
    if env:
        return Path(env)
    return Path(sys.prefix) / "share" / "ember" / "tvm-aarch64"


@dataclass(frozen=True)
class Toolchain:
    """Resolved paths of every tool; ``missing`` lists what is absent (empty when usable)."""

    cxx: str | None
    objdump: str | None
    qemu: str | None
    runtime: Path
    tvm_version: str | None
    ffi_version: str | None
    missing: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.missing

    @property
    def can_compile(self) -> bool:
        """TVM, the cross linker and the aarch64 runtime are here (qemu is only for running)."""
        return not [m for m in self.missing if m.startswith(QEMU)]

    @property
    def lib_dir(self) -> Path:
        return self.runtime / "lib"

    @property
    def include_dir(self) -> Path:
        return self.runtime / "include"

    def reason(self) -> str:
        if self.ok:
            return (f"TVM {self.tvm_version} (ffi {self.ffi_version}), {self.cxx}, "
                    f"{self.qemu}, aarch64 runtime in {self.runtime}")
        return ("missing: " + "; ".join(self.missing)
                + f". Install with: sudo bash {SETUP_SCRIPT} (idempotent)")

    def require(self, *, run: bool = False) -> None:
        if not (self.ok if run else self.can_compile):
            raise BackendUnavailableError(f"mobile backend: {self.reason()}")

    def qemu_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["QEMU_LD_PREFIX"] = str(SYSROOT)
        env["LD_LIBRARY_PATH"] = str(self.lib_dir)
        return env


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def find_toolchain() -> Toolchain:
    missing: list[str] = []
    tvm_v, ffi_v = _version("apache-tvm"), _version("apache-tvm-ffi")
    if tvm_v is None:
        missing.append(f"apache-tvm=={TVM_VERSION} (pip)")
    elif tvm_v != TVM_VERSION:
        missing.append(f"apache-tvm=={TVM_VERSION} (found {tvm_v})")
    if ffi_v is None:
        missing.append(f"apache-tvm-ffi=={TVM_FFI_VERSION} (pip)")
    elif ffi_v != TVM_FFI_VERSION:
        missing.append(f"apache-tvm-ffi=={TVM_FFI_VERSION} (found {ffi_v}; other versions "
                       f"crashed TVM's serializer)")
    cxx, objdump, qemu = shutil.which(CROSS_CXX), shutil.which(OBJDUMP), shutil.which(QEMU)
    if cxx is None:
        missing.append(f"{CROSS_CXX} (apt: g++-aarch64-linux-gnu)")
    if objdump is None:
        missing.append(f"{OBJDUMP} (apt: binutils-aarch64-linux-gnu)")
    rt = runtime_dir()
    absent = [lib for lib in RUNTIME_LIBS if not (rt / "lib" / lib).is_file()]
    if absent or not (rt / "include" / "tvm" / "ffi").is_dir():
        missing.append(f"aarch64 TVM runtime in {rt} ({', '.join(absent) or 'headers'})")
    if qemu is None:
        missing.append(f"{QEMU} (apt: qemu-user)")
    elif not SYSROOT.is_dir():
        missing.append(f"{QEMU} needs the aarch64 sysroot {SYSROOT} (apt: g++-aarch64-linux-gnu)")
    return Toolchain(cxx, objdump, qemu, rt, tvm_v, ffi_v, tuple(missing))


_RUNNER_LOCK = threading.Lock()


def runner_binary(tc: Toolchain) -> Path:
    """The aarch64 runner built from ``runner.cc`` (cached next to the runtime by source hash)."""
    tc.require()
    src = RUNNER_SOURCE.read_bytes()
    digest = hashlib.sha256(src + TVM_VERSION.encode() + TVM_FFI_VERSION.encode()).hexdigest()
    out = tc.runtime / "bin" / f"ember-runner-{digest[:12]}"
    with _RUNNER_LOCK:
        if out.is_file():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        cmd = [tc.cxx or CROSS_CXX, "-std=c++17", "-O2", str(RUNNER_SOURCE),
               f"-I{tc.include_dir}", f"-L{tc.lib_dir}", "-ltvm_runtime", "-ltvm_ffi",
               f"-Wl,-rpath-link,{tc.lib_dir}", "-o", str(tmp)]
        log.info("building the aarch64 runner: %s", " ".join(cmd))
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise BackendUnavailableError(f"cannot build the aarch64 runner:\n{res.stderr[-2000:]}")
        tmp.replace(out)
    return out
