"""Evidence about generated aarch64 code: NEON instructions in the binary, executed instructions.

- `neon_report(lib)`: disassembles the library with ``aarch64-linux-gnu-objdump`` and counts
  the vector instructions the schedules are meant to produce (``fmla v*.4s``, ``fmul v*.4s``,
  128-bit loads, ``sdot``/``udot``, widening integer multiply-accumulates), in the model's kernels only (TVM runtime glue excluded by
  the kernel symbol names).
- `count_instructions(program, inputs)`: guest instructions executed by one call of ``main``,
  counted under qemu with a tiny TCG plugin (``insn_count.c``, built here with the host C
  compiler): a run with ``--repeat N`` minus a run without, divided by N, so loading the runtime
  and the library is not counted. valgrind cannot run aarch64 code on x86; qemu's count is exact
  for a single thread (``TVM_NUM_THREADS=1``).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.errors import BackendUnavailableError, CompilerError

from .build import save_tensors
from .toolchain import HERE, find_toolchain

__all__ = ["NeonReport", "neon_report", "count_instructions", "insn_plugin"]

log = logging.getLogger(__name__)

PLUGIN_SOURCE = HERE / "insn_count.c"
# integer NEON products of the int8 GEMM without +dotprod (LLVM widens int8 -> int16 -> int32)
INT_MAC = ("smull", "smlal", "saddw", "umull", "umlal", "mla")
_FUNC_RE = re.compile(r"^[0-9a-f]+ <(?P<name>[^>]+)>:$")
_INSN_RE = re.compile(r"^\s+[0-9a-f]+:\s+[0-9a-f]{8}\s+(?P<mn>\S+)\s*(?P<ops>.*)$")


@dataclass
class NeonReport:
    """Instruction statistics of the kernels in one library."""

    kernels: int
    instructions: int
    fmla_4s: int
    fmul_4s: int
    vector_fp: int  # every f* instruction on .4s/.2d/.8h vectors
    q_loads: int  # ldr q / ld1 {v.4s} / ldp q
    dot: int  # sdot/udot (int8, +dotprod)
    int_mac: int  # widening integer NEON multiply(-accumulate)s: smull/smlal/saddw(2), mla
    mnemonics: Counter[str]

    def to_json(self) -> dict[str, Any]:
        return {"kernels": self.kernels, "instructions": self.instructions,
                "fmla_4s": self.fmla_4s, "fmul_4s": self.fmul_4s, "vector_fp": self.vector_fp,
                "q_loads": self.q_loads, "dot": self.dot, "int_mac": self.int_mac,
                "top": dict(self.mnemonics.most_common(12))}


def disassemble(lib: Path) -> str:
    tc = find_toolchain()
    if tc.objdump is None:
        raise BackendUnavailableError("aarch64-linux-gnu-objdump is missing "
                                      "(apt: binutils-aarch64-linux-gnu)")
    res = subprocess.run([tc.objdump, "-d", str(lib)],
                         capture_output=True, text=True, check=True)
    return res.stdout


def _is_kernel(name: str) -> bool:
    # TVM's kernels: the packed wrapper __tvm_ffi_<kernel> and the body <kernel>_compute_
    # (parallel loops become lambdas inside it); the rest is loader/VM glue
    return (name.startswith("__tvm_ffi_") or "_compute_" in name) and "@" not in name


def neon_report(lib: Path) -> NeonReport:
    """Counts NEON instructions in ``lib``'s kernels (see the module doc)."""
    text = disassemble(lib)
    cur: str | None = None
    kernels: set[str] = set()
    mn: Counter[str] = Counter()
    fmla = fmul = vfp = qld = dot = imac = total = 0
    for line in text.splitlines():
        m = _FUNC_RE.match(line)
        if m:
            cur = m.group("name")
            continue
        if cur is None or not _is_kernel(cur):
            continue
        m = _INSN_RE.match(line)
        if not m:
            continue
        kernels.add(cur)
        op, ops = m.group("mn"), m.group("ops")
        total += 1
        mn[op] += 1
        vec = bool(re.search(r"\bv\d+\.(4s|2d|8h)", ops))
        if op == "fmla" and ".4s" in ops:
            fmla += 1
        if op == "fmul" and ".4s" in ops:
            fmul += 1
        if op.startswith("f") and vec:
            vfp += 1
        if (op in ("ldr", "ldp", "ldur") and re.match(r"q\d+", ops)) or \
                (op.startswith("ld1") and ".4s" in ops):
            qld += 1
        if op in ("sdot", "udot"):
            dot += 1
        if op.rstrip("2") in INT_MAC and re.search(r"\bv\d+\.(4s|8h|2d)", ops):
            imac += 1
    return NeonReport(len(kernels), total, fmla, fmul, vfp, qld, dot, imac, mn)


# ----------------------------------------------------------------------------- counting
def insn_plugin() -> Path:
    """The qemu instruction-count plugin, built with the host C compiler (cached)."""
    tc = find_toolchain()
    out = tc.runtime / "bin" / "libemberinsncount.so"
    if out.is_file() and out.stat().st_mtime >= PLUGIN_SOURCE.stat().st_mtime:
        return out
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BackendUnavailableError("no host C compiler (cc/gcc) to build the qemu plugin")
    out.parent.mkdir(parents=True, exist_ok=True)
    res = subprocess.run([cc, "-shared", "-fPIC", "-O2", str(PLUGIN_SOURCE), "-o", str(out)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise BackendUnavailableError(f"cannot build the qemu plugin: {res.stderr[-1000:]}")
    return out


def _count(program: Any, tmp: Path, repeat: int) -> int:
    from .program import run_under_qemu

    log_path = tmp / f"count{repeat}.log"
    run_under_qemu(program.library, program.weights, tmp / "inputs.params",
                   tmp / "outputs.params", repeat=repeat, threads=1, plugin=insn_plugin(),
                   plugin_log=log_path)
    m = re.search(r"insns: (\d+)", log_path.read_text())
    if not m:
        raise CompilerError(f"the qemu plugin wrote no count to {log_path}")
    return int(m.group(1))


def count_instructions(program: Any, inputs: Any, repeat: int = 3) -> int:
    """aarch64 instructions one call of ``program`` (a `MobileProgram`) executes."""
    with tempfile.TemporaryDirectory(prefix="ember-insn-") as d:
        tmp = Path(d)
        save_tensors(tmp / "inputs.params", program._prepare(inputs))
        base = _count(program, tmp, 0)
        more = _count(program, tmp, repeat)
    per_call = (more - base) // repeat
    log.info("instructions per call: %d (runs: %d, %d with %d repeats)", per_call, base, more,
             repeat)
    return per_call


# ----------------------------------------------------------------------------- comparison
def compare_schedules(graph: Any, example: Any, *, cpu: str = "generic",
                      repeat: int = 3) -> dict[str, Any]:
    """Builds ``graph`` with the NEON schedules and untuned, counts instructions per call of
    each under qemu and disassembles both; returns the numbers and the ratio."""
    from . import compile_graph

    out: dict[str, Any] = {}
    for sched in ("none", "neon"):
        prog = compile_graph(graph, example, cpu=cpu, schedule=sched)
        out[sched] = {"instructions": count_instructions(prog, example, repeat=repeat),
                      "neon": neon_report(prog.library).to_json(),
                      "build_seconds": prog.info["build_seconds"],
                      "rules": prog.info["rules"]}
    out["ratio"] = out["none"]["instructions"] / max(1, out["neon"]["instructions"])
    return out
