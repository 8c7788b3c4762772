"""How a kernel launch happens: JIT (or the interpreter), a precompiled cubin, or recording.

Every launcher in `ops` ends in `launch(name, grid, args, constexprs, num_warps)`. Three modes:

- normal: ``KERNELS[name][grid](*args, **constexprs)``, the Triton JIT on a GPU, or the Triton
  interpreter on CPU tensors when ``TRITON_INTERPRET=1`` (how the tests run every kernel);
- AOT: when a `KernelTable` of cubins loaded from an artifact holds the exact specialization,
  its `CompiledKernel` is launched directly (no compiler at run time);
- recording (`record_launches`): nothing runs; the launch's *specialization* (kernel name,
  Triton signature from the argument dtypes, constexprs, warps, stages) is collected so the
  compiler can build every kernel a graph needs ahead of time, without a GPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["KernelSpec", "launch", "record_launches", "KernelTable", "use_kernel_table",
           "arg_names", "triton_type"]

log = logging.getLogger(__name__)

_TORCH_TO_TRITON = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32",
    torch.int64: "i64",
}


def triton_type(v: Any) -> str:
    """The Triton signature type of one launch argument (ints are never specialized)."""
    if isinstance(v, torch.Tensor):
        try:
            return "*" + _TORCH_TO_TRITON[v.dtype]
        except KeyError:
            raise TypeError(f"no Triton pointer type for {v.dtype}") from None
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -(2**31) <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"cannot pass {type(v).__name__} to a Triton kernel")


@dataclass(frozen=True)
class KernelSpec:
    """One specialization of one kernel: what `triton.compile` needs to build it."""

    kernel: str
    signature: tuple[tuple[str, str], ...]   # (param, triton type) of every runtime param
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int = 4
    num_stages: int = 3

    @property
    def key(self) -> str:
        """A stable id: kernel, signature types and constexpr values."""
        sig = ",".join(t for _, t in self.signature)
        cst = ",".join(f"{k}={v}" for k, v in self.constexprs)
        return f"{self.kernel}[{sig}|{cst}|w{self.num_warps}s{self.num_stages}]"

    def to_json(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "signature": [list(p) for p in self.signature],
                "constexprs": [list(p) for p in self.constexprs], "num_warps": self.num_warps,
                "num_stages": self.num_stages}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> KernelSpec:
        return KernelSpec(d["kernel"], tuple((a, b) for a, b in d["signature"]),
                          tuple((a, b) for a, b in d["constexprs"]), int(d["num_warps"]),
                          int(d["num_stages"]))


_NAMES: dict[str, tuple[list[str], set[str]]] = {}


def arg_names(kernel: str) -> tuple[list[str], set[str]]:
    """(parameter names in order, names annotated ``tl.constexpr``) of a kernel."""
    got = _NAMES.get(kernel)
    if got is None:
        from .kernels import KERNELS

        fn = KERNELS[kernel]
        py = getattr(fn, "fn", fn)
        params = inspect.signature(py).parameters
        names = list(params)
        const = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
        got = _NAMES[kernel] = (names, const)
    return got


_RECORDER: contextvars.ContextVar[list[KernelSpec] | None] = contextvars.ContextVar(
    "ember_cuda_recorder", default=None)
_TABLE: contextvars.ContextVar[KernelTable | None] = contextvars.ContextVar(
    "ember_cuda_table", default=None)


@contextlib.contextmanager
def record_launches() -> Iterator[list[KernelSpec]]:
    """Within the block, launches are recorded (deduplicated, in first-launch order)."""
    specs: list[KernelSpec] = []
    tok = _RECORDER.set(specs)
    try:
        yield specs
    finally:
        _RECORDER.reset(tok)


def make_spec(kernel: str, args: Sequence[Any], constexprs: Mapping[str, Any],
              num_warps: int, num_stages: int) -> KernelSpec:
    names, const = arg_names(kernel)
    runtime = [n for n in names if n not in const]
    if len(runtime) != len(args):
        raise TypeError(f"{kernel}: {len(args)} runtime arguments for {len(runtime)} params")
    missing = const - set(constexprs)
    if missing:
        raise TypeError(f"{kernel}: constexprs {sorted(missing)} not given")
    sig = tuple((n, triton_type(a)) for n, a in zip(runtime, args))
    cst = tuple((n, constexprs[n]) for n in names if n in const)
    return KernelSpec(kernel, sig, cst, num_warps, num_stages)


def launch(kernel: str, grid: tuple[int, ...], args: Sequence[Any],
           constexprs: Mapping[str, Any], num_warps: int = 4, num_stages: int = 3) -> None:
    """Launches (or records) ``kernel`` over ``grid`` with runtime ``args`` in param order."""
    rec = _RECORDER.get()
    if rec is not None:
        spec = make_spec(kernel, args, constexprs, num_warps, num_stages)
        if spec not in rec:
            rec.append(spec)
        return
    if any(g == 0 for g in grid):
        return
    table = _TABLE.get()
    if table is not None and args and isinstance(args[0], torch.Tensor) and args[0].is_cuda:
        spec = make_spec(kernel, args, constexprs, num_warps, num_stages)
        ck = table.get(spec)
        if ck is not None:
            names, const = arg_names(kernel)
            it = iter(args)
            full = [constexprs[n] if n in const else next(it) for n in names]
            ck[grid](*full)
            return
        table.misses += 1
    from .kernels import KERNELS

    KERNELS[kernel][grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)


@dataclass
class KernelTable:
    """Precompiled kernels (from an artifact's payload) keyed by `KernelSpec.key`."""

    kernels: dict[str, Any] = field(default_factory=dict)
    misses: int = 0

    def get(self, spec: KernelSpec) -> Any:
        return self.kernels.get(spec.key)

    @staticmethod
    def from_payload(directory: Any, manifest: Mapping[str, Any], arch: int) -> KernelTable:
        """Builds `CompiledKernel`s for ``arch`` (e.g. 90) from the payload's files."""
        from pathlib import Path

        from triton.compiler.compiler import CompiledKernel

        d = Path(directory)
        table = KernelTable()
        for entry in manifest.get("kernels", []):
            files = entry.get("binaries", {}).get(f"sm_{arch}")
            if not files:
                continue
            group = {Path(f).name: str(_inside(d, f)) for f in files.values()}
            meta = json.loads(_inside(d, files["json"]).read_text())
            table.kernels[entry["key"]] = CompiledKernel(None, group, meta.get("hash", ""))
        return table


def _inside(root: Any, rel: Any) -> Any:
    """``root / rel`` when ``rel`` is a plain relative path that stays inside ``root``; a kernel
    manifest naming anything else (absolute, ``..``, a link out) is refused."""
    from pathlib import Path

    from ember.errors import ArtifactError

    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise ArtifactError(f"kernel manifest in {root}: path {str(rel)[:80]!r} leaves the payload")
    p = Path(root) / rel
    if not p.resolve().is_relative_to(Path(root).resolve()):
        raise ArtifactError(f"kernel manifest in {root}: path {rel[:80]!r} leaves the payload")
    return p


@contextlib.contextmanager
def use_kernel_table(table: KernelTable | None) -> Iterator[None]:
    tok = _TABLE.set(table)
    try:
        yield
    finally:
        _TABLE.reset(tok)
