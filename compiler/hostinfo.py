"""What the host CPU is: model name, feature flags, and Ember's per-machine cache folder.

A leaf module (no imports of ours), read by the cost model's device probe, the CPU backend's
ONNX Runtime tuning and the quantization gate, each of which keys its cached measurements on
the machine.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["cpu_model", "cpu_flags", "has_int8_dot", "cache_dir"]


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1]
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    v = _cpuinfo_field("model name")
    return v.strip() if v is not None else platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU feature flags (``avx2``, ``avx512_vnni``, ...); empty where unknown."""
    v = _cpuinfo_field("flags")
    return set(v.split()) if v is not None else set()


# u8 x s8 dot-product instructions that accumulate straight into int32 (no int16 pair sums that
# saturate, as AVX2's vpmaddubsw does): full-range u8 activations are exact in MLAS with these
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def has_int8_dot() -> bool:
    """Whether the CPU has VNNI or AMX int8 (x86); aarch64's sdot/udot count too."""
    f = cpu_flags()
    return any(x in f for x in INT8_DOT_FLAGS) or "asimddp" in f


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ember`` (default ``~/.cache/ember``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ember"
